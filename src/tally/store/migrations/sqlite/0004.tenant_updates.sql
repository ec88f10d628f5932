-- Tenants can be changed (PATCH /v1/tenants/{id}, `tally tenants update`): their name and
-- lateness window only. The trigger keeps fixed what must never move, whoever writes: a
-- tenant's id, its home region (its data lives there) and its creation time.
CREATE TRIGGER tenants_fixed_fields BEFORE UPDATE OF id, region, created_at ON tenants
    WHEN NEW.id IS NOT OLD.id OR NEW.region IS NOT OLD.region
        OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'a tenant''s id, region and creation time never change');
END;
