-- Cancellations: one per event at most (its identity is the primary key), an export-log entry
-- of its own. `(partition, log_offset)` comes from the same counter as the events' (the
-- event's partition, log_partitions), inside the same kind of write transaction, so one
-- reader position covers both kinds in commit order. The reason is sealed under the tenant's
-- data key (base64 text, like events' attributes).
CREATE TABLE cancellations (
    partition   INTEGER NOT NULL,
    log_offset  INTEGER NOT NULL,
    application TEXT NOT NULL,
    id          TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (application, id),
    UNIQUE (partition, log_offset),
    FOREIGN KEY (application, id) REFERENCES events (application, id)
) WITHOUT ROWID;

-- Append-only, like events.
CREATE TRIGGER cancellations_no_update BEFORE UPDATE ON cancellations
BEGIN SELECT RAISE(ABORT, 'cancellations are append-only'); END;
CREATE TRIGGER cancellations_no_delete BEFORE DELETE ON cancellations
BEGIN SELECT RAISE(ABORT, 'cancellations are append-only'); END;
