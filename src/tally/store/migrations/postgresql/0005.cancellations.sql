-- Cancellations: one per event at most (its identity is the primary key), an export-log entry
-- of its own. `(partition, log_offset)` comes from the same counter as the events' (the
-- event's partition, log_partitions, locked FOR UPDATE until commit), so one reader position
-- covers both kinds in commit order. The reason is sealed under the tenant's data key. The
-- service role may INSERT and SELECT only (store/grants.py).
CREATE TABLE cancellations (
    partition   smallint NOT NULL,
    log_offset  bigint NOT NULL,
    application text NOT NULL,
    id          text NOT NULL,
    tenant      text NOT NULL,
    reason      bytea NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (application, id),
    UNIQUE (partition, log_offset),
    FOREIGN KEY (application, id) REFERENCES events (application, id)
);

-- Append-only even for the owner, like events.
CREATE FUNCTION tally_cancellations_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cancellations are append-only';
END;
$$;

CREATE TRIGGER cancellations_append_only BEFORE UPDATE OR DELETE ON cancellations
    FOR EACH ROW EXECUTE FUNCTION tally_cancellations_append_only();
