-- The export log's epochs (events/log.py LogEpoch). A restore from a backup, or a
-- point-in-time recovery, rewinds the log: a billing system may then hold a cursor past its
-- end, and new entries would take offsets it has already passed. Every cursor carries the
-- epoch it was issued in; a new epoch starts at every restore (`tally restore`, `tally epoch
-- renew`), and a cursor of another epoch is refused with where to resume (services/export.py).
-- `base` holds the per-partition offsets the log had when the epoch began (a JSON array):
-- the last point every earlier epoch's reader and this log agree on. Append-only.
CREATE TABLE log_epochs (
    seq        INTEGER PRIMARY KEY,
    epoch      BLOB NOT NULL UNIQUE,
    started_at TEXT NOT NULL,
    reason     TEXT NOT NULL,
    base       TEXT NOT NULL
);

-- The first epoch: the log as it has been since it was created.
INSERT INTO log_epochs (seq, epoch, started_at, reason, base)
VALUES (1, randomblob(16), strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'), 'created', '[]');

CREATE TRIGGER log_epochs_no_update BEFORE UPDATE ON log_epochs
BEGIN SELECT RAISE(ABORT, 'log_epochs are append-only'); END;
CREATE TRIGGER log_epochs_no_delete BEFORE DELETE ON log_epochs
BEGIN SELECT RAISE(ABORT, 'log_epochs are append-only'); END;
