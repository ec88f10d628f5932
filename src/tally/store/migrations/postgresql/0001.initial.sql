-- Tally's initial schema on PostgreSQL. No per-tenant tables: every hot query is keyed by
-- (partition, log_offset) or (application, id), so the log can be distributed by partition.
CREATE TABLE tenants (
    id             text PRIMARY KEY,
    name           text,
    region         text NOT NULL,
    lateness_hours integer NOT NULL CHECK (lateness_hours BETWEEN 1 AND 840),
    created_at     timestamptz NOT NULL
);

CREATE TABLE applications (
    id         text PRIMARY KEY,
    name       text,
    created_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    secret_hash bytea NOT NULL UNIQUE,
    scopes      text NOT NULL,
    application text REFERENCES applications (id),
    tenants     text,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE TABLE secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);

-- One counter row per export-log partition; see store/interface.py for why.
CREATE TABLE log_partitions (
    partition   smallint PRIMARY KEY,
    last_offset bigint NOT NULL
);

INSERT INTO log_partitions (partition, last_offset) SELECT n, 0 FROM generate_series(0, 15) AS n;

CREATE TABLE events (
    partition   smallint NOT NULL,
    log_offset  bigint NOT NULL,
    application text NOT NULL,
    id          text NOT NULL,
    tenant      text NOT NULL,
    type        text NOT NULL,
    quantity    numeric(38, 18) NOT NULL CHECK (quantity >= 0),
    time        timestamptz NOT NULL,
    subject     text,
    unit        text,
    attributes  text NOT NULL,
    region      text NOT NULL,
    received_at timestamptz NOT NULL,
    digest      bytea NOT NULL,
    PRIMARY KEY (partition, log_offset),
    UNIQUE (application, id)
);

CREATE INDEX events_tenant_time ON events (tenant, time);
-- A tenant lives in one partition: its export reads walk this index in log order.
CREATE INDEX events_tenant_log ON events (tenant, log_offset);

-- Append-only even for the owner: a trigger refuses UPDATE and DELETE of events.
CREATE FUNCTION tally_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END;
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION tally_events_append_only();
