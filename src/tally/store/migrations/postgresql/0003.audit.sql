-- Key management and the audit log on PostgreSQL.
-- A rotated key points at its replacement and the replacement at it, so a listing shows the
-- chain; last_used_at is written at most once a minute per key (see auth/service.py).
ALTER TABLE api_keys
    ADD COLUMN last_used_at timestamptz,
    ADD COLUMN rotated_from text,
    ADD COLUMN replaced_by  text;

-- Every administrative action, written in the transaction of the action it records. `seq`
-- orders the log (newest first in listings) and is the listing's cursor.
CREATE TABLE audit_log (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,  -- a key id, or 'cli:<OS user>'
    action     text NOT NULL,  -- e.g. 'key.rotate'
    target     text,
    details    text NOT NULL,  -- small JSON object; never a secret or an attribute value
    source     text NOT NULL,  -- the client address, or 'cli'
    request_id text
);

CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);

-- Append-only even for the owner, like events.
CREATE FUNCTION tally_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION tally_audit_append_only();
