-- Usage and meters (docs/usage.md). Each event gets `attribute_tokens`: a JSON object from a
-- keyed token of each attribute key to a keyed token of its value (crypto/sealing.py
-- TenantCipher.tokens), so that usage can group by any attribute in SQL without opening the
-- sealed attributes. NULL for events stored before this migration until `tally reindex`
-- fills it in. `attribute_values` is the sealed dictionary that turns a value token back into
-- its value: the value sealed under the tenant's data key.
ALTER TABLE events ADD COLUMN attribute_tokens jsonb;

CREATE TABLE attribute_values (
    tenant text NOT NULL,
    token  text NOT NULL,
    sealed bytea NOT NULL,
    PRIMARY KEY (tenant, token)
);

-- Usage buckets events with one index search per window: by (tenant, time) for one tenant,
-- by time alone for a query over every tenant.
CREATE INDEX events_time ON events (time);

-- Saved usage queries (POST /v1/meters): the query as canonical JSON.
CREATE TABLE meters (
    id         text PRIMARY KEY,
    spec       text NOT NULL,
    created_at timestamptz NOT NULL
);

-- Still append-only, but for the one backfill: `attribute_tokens` may be set once, from
-- NULL, on an event whose other columns stay as they are (tally reindex, run as the owner).
CREATE OR REPLACE FUNCTION tally_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.attribute_tokens IS NULL AND NEW.attribute_tokens IS NOT NULL
       AND (NEW.partition, NEW.log_offset, NEW.application, NEW.id, NEW.tenant, NEW.type,
            NEW.quantity, NEW.time, NEW.subject, NEW.unit, NEW.attributes, NEW.region,
            NEW.received_at, NEW.digest)
           IS NOT DISTINCT FROM
           (OLD.partition, OLD.log_offset, OLD.application, OLD.id, OLD.tenant, OLD.type,
            OLD.quantity, OLD.time, OLD.subject, OLD.unit, OLD.attributes, OLD.region,
            OLD.received_at, OLD.digest) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are append-only';
END;
$$;
