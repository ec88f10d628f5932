-- Encryption at rest (crypto/): each tenant's data key, wrapped by a master key from the
-- keyring; attributes become sealed bytes. Rows written before this migration keep their
-- plaintext JSON (it starts with '{', a sealed value with the version byte 0x01).
CREATE TABLE tenant_keys (
    tenant        text PRIMARY KEY REFERENCES tenants (id),
    master_key_id text,
    wrapped       bytea,
    created_at    timestamptz NOT NULL,
    rewrapped_at  timestamptz,
    shredded_at   timestamptz,
    -- Shredding destroys the wrapped key and its master key reference together, for good.
    CHECK ((wrapped IS NULL) = (shredded_at IS NOT NULL)),
    CHECK ((master_key_id IS NULL) = (shredded_at IS NOT NULL))
);

CREATE INDEX tenant_keys_master ON tenant_keys (master_key_id) WHERE wrapped IS NOT NULL;

-- A shredded key stays shredded.
CREATE FUNCTION tally_tenant_keys_stay_shredded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.shredded_at IS NOT NULL THEN
        RAISE EXCEPTION 'a shredded data key stays shredded';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tenant_keys_stay_shredded BEFORE UPDATE OR DELETE ON tenant_keys
    FOR EACH ROW EXECUTE FUNCTION tally_tenant_keys_stay_shredded();

ALTER TABLE events ALTER COLUMN attributes TYPE bytea USING convert_to(attributes, 'UTF8');
