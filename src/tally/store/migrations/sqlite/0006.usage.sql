-- Usage and meters (docs/usage.md). Each event gets `attribute_tokens`: a JSON object from a
-- keyed token of each attribute key to a keyed token of its value (crypto/sealing.py
-- TenantCipher.tokens), so that usage can group by any attribute in SQL without opening the
-- sealed attributes. NULL for events stored before this migration until `tally reindex`
-- fills it in. `attribute_values` is the sealed dictionary that turns a value token back into
-- its value: the value sealed under the tenant's data key (base64 text, as attributes are).
ALTER TABLE events ADD COLUMN attribute_tokens TEXT;

CREATE TABLE attribute_values (
    tenant TEXT NOT NULL,
    token  TEXT NOT NULL,
    sealed TEXT NOT NULL,
    PRIMARY KEY (tenant, token)
) WITHOUT ROWID;

-- Usage buckets events with one index search per window: by (tenant, time) for one tenant,
-- by time alone for a query over every tenant.
CREATE INDEX events_time ON events (time);

-- Saved usage queries (POST /v1/meters): the query as canonical JSON.
CREATE TABLE meters (
    id         TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- Still append-only, but for the one backfill: `attribute_tokens` may be set once, from
-- NULL, on an event whose other columns stay as they are (tally reindex).
DROP TRIGGER events_no_update;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    WHEN OLD.attribute_tokens IS NOT NULL OR NEW.attribute_tokens IS NULL
      OR NEW.partition IS NOT OLD.partition OR NEW.log_offset IS NOT OLD.log_offset
      OR NEW.application IS NOT OLD.application OR NEW.id IS NOT OLD.id
      OR NEW.tenant IS NOT OLD.tenant OR NEW.type IS NOT OLD.type
      OR NEW.quantity IS NOT OLD.quantity OR NEW.time IS NOT OLD.time
      OR NEW.subject IS NOT OLD.subject OR NEW.unit IS NOT OLD.unit
      OR NEW.attributes IS NOT OLD.attributes OR NEW.region IS NOT OLD.region
      OR NEW.received_at IS NOT OLD.received_at OR NEW.digest IS NOT OLD.digest
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
