-- Key management and the audit log on SQLite (times are fixed-width RFC 3339 UTC text).
-- A rotated key points at its replacement and the replacement at it, so a listing shows the
-- chain; last_used_at is written at most once a minute per key (see auth/service.py).
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN rotated_from TEXT;
ALTER TABLE api_keys ADD COLUMN replaced_by TEXT;

-- Every administrative action, written in the transaction of the action it records. `seq`
-- orders the log (newest first in listings) and is the listing's cursor.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,  -- a key id, or 'cli:<OS user>'
    action     TEXT NOT NULL,  -- e.g. 'key.rotate'
    target     TEXT,
    details    TEXT NOT NULL,  -- small JSON object; never a secret or an attribute value
    source     TEXT NOT NULL,  -- the client address, or 'cli'
    request_id TEXT
);

CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);

-- Append-only, like events.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
