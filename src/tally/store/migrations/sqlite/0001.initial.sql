-- Tally's initial schema on SQLite. Times are RFC 3339 UTC text of fixed width (text order is
-- time order); quantities are exact decimal text (SQLite has no NUMERIC(38,18)).
CREATE TABLE tenants (
    id             TEXT PRIMARY KEY,
    name           TEXT,
    region         TEXT NOT NULL,
    lateness_hours INTEGER NOT NULL,
    created_at     TEXT NOT NULL
);

CREATE TABLE applications (
    id         TEXT PRIMARY KEY,
    name       TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    application TEXT REFERENCES applications (id),
    tenants     TEXT,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
);

CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- One counter row per export-log partition; see store/interface.py for why.
CREATE TABLE log_partitions (
    partition   INTEGER PRIMARY KEY,
    last_offset INTEGER NOT NULL
);

WITH RECURSIVE p(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n < 15)
INSERT INTO log_partitions (partition, last_offset) SELECT n, 0 FROM p;

CREATE TABLE events (
    partition   INTEGER NOT NULL,
    log_offset  INTEGER NOT NULL,
    application TEXT NOT NULL,
    id          TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    type        TEXT NOT NULL,
    quantity    TEXT NOT NULL CHECK (quantity NOT LIKE '-%'),
    time        TEXT NOT NULL,
    subject     TEXT,
    unit        TEXT,
    attributes  TEXT NOT NULL,
    region      TEXT NOT NULL,
    received_at TEXT NOT NULL,
    digest      TEXT NOT NULL, -- hex SHA-256 of the content (see events/model.py)
    PRIMARY KEY (partition, log_offset),
    UNIQUE (application, id)
) WITHOUT ROWID;

CREATE INDEX events_tenant_time ON events (tenant, time);
-- A tenant lives in one partition: its export reads walk this index in log order.
CREATE INDEX events_tenant_log ON events (tenant, log_offset);

-- Append-only: the store never updates or deletes an event.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
