-- The shredded tenants, for the export: every page of it asks which of its tenants are
-- shredded in its own snapshot (store/sql.py read_rows), which without this index is one
-- primary-key lookup per tenant of the page (about 3 ms of PostgreSQL's time per 1,000
-- entries on a store of 10,000 tenants) to find, nearly always, none. It holds only the
-- shredded tenants, and tenant_keys is written once per tenant and once per shred, never by
-- ingest.
CREATE INDEX tenant_keys_shredded ON tenant_keys (tenant) WHERE wrapped IS NULL;
