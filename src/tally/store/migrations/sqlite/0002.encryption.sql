-- Encryption at rest (crypto/): each tenant's data key, wrapped by a master key from the
-- keyring. events.attributes now holds the sealed bytes in base64 (rows written before this
-- migration keep their plaintext JSON, which starts with '{'; base64 never does).
CREATE TABLE tenant_keys (
    tenant        TEXT PRIMARY KEY REFERENCES tenants (id),
    master_key_id TEXT,
    wrapped       BLOB,
    created_at    TEXT NOT NULL,
    rewrapped_at  TEXT,
    shredded_at   TEXT,
    CHECK ((wrapped IS NULL) = (shredded_at IS NOT NULL)),
    CHECK ((master_key_id IS NULL) = (shredded_at IS NOT NULL))
);

CREATE INDEX tenant_keys_master ON tenant_keys (master_key_id) WHERE wrapped IS NOT NULL;

CREATE TRIGGER tenant_keys_stay_shredded BEFORE UPDATE ON tenant_keys
    WHEN OLD.shredded_at IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'a shredded data key stays shredded');
END;

CREATE TRIGGER tenant_keys_never_deleted BEFORE DELETE ON tenant_keys
    WHEN OLD.shredded_at IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'a shredded data key stays shredded');
END;
