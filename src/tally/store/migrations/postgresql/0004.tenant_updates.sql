-- Tenants can be changed (PATCH /v1/tenants/{id}, `tally tenants update`): their name and
-- lateness window only. From this version the service role may UPDATE tenants (store/grants.py;
-- this migration makes `tally migrate` run again, which grants it); the trigger keeps fixed what
-- must never move, whoever writes: a tenant's id, its home region (its data lives there) and
-- its creation time.
CREATE FUNCTION tally_tenant_fixed_fields() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id <> OLD.id OR NEW.region <> OLD.region OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'a tenant''s id, region and creation time never change';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tenants_fixed_fields BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tally_tenant_fixed_fields();
