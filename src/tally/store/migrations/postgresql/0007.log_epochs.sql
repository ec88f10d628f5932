-- The export log's epochs (events/log.py LogEpoch). A restore from a backup, or a
-- point-in-time recovery, rewinds the log: a billing system may then hold a cursor past its
-- end, and new entries would take offsets it has already passed. Every cursor carries the
-- epoch it was issued in; a new epoch starts at every restore (`tally restore`, `tally epoch
-- renew`), and a cursor of another epoch is refused with where to resume (services/export.py).
-- `base` holds the per-partition offsets the log had when the epoch began (a JSON array):
-- the last point every earlier epoch's reader and this log agree on. The service role may
-- INSERT and SELECT only (store/grants.py).
CREATE TABLE log_epochs (
    seq        bigint PRIMARY KEY,
    epoch      bytea NOT NULL UNIQUE,
    started_at timestamptz NOT NULL,
    reason     text NOT NULL,
    base       text NOT NULL
);

-- The first epoch: the log as it has been since it was created.
INSERT INTO log_epochs (seq, epoch, started_at, reason, base)
VALUES (1, uuid_send(gen_random_uuid()), now(), 'created', '[]');

CREATE FUNCTION tally_log_epochs_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'log_epochs are append-only';
END;
$$;

CREATE TRIGGER log_epochs_append_only BEFORE UPDATE OR DELETE ON log_epochs
    FOR EACH ROW EXECUTE FUNCTION tally_log_epochs_append_only();
