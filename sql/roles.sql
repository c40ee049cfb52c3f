-- A least-privilege role for relocator. Run as the table's owner or a superuser:
--   psql "$ADMIN_DATABASE_URL" -v password="'choose-one'" -f sql/roles.sql
-- Adjust the table name if yours is not public.avatars.
--
-- What it may do, and why:
--   CONNECT                  open a session
--   USAGE on the schema      see the table
--   SELECT, UPDATE on table  the keyset scan and the guarded rewrite. UPDATE is granted on
--                            the table, not only the path column, because PostgreSQL asks
--                            table-level UPDATE for LOCK TABLE ... IN SHARE MODE, which the
--                            cleanup takes for a moment so that no row the application is
--                            writing at that instant can reference a key being deleted
--   own schema "relocator"   its ledger (runs, moves), created by relocator on first use
--   each --referenced-by     SELECT on the column and UPDATE on its table, for the same
--                            reason: the cleanup holds that table's writers off too, e.g.
--                              GRANT SELECT (image), UPDATE ON public.posts TO relocator_job;
-- Nothing else: no DELETE/INSERT on the table, no DDL outside its own schema.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relocator_job') THEN
        CREATE ROLE relocator_job LOGIN;
    END IF;
END
$$;
ALTER ROLE relocator_job WITH LOGIN PASSWORD :password;

SELECT format('GRANT CONNECT ON DATABASE %I TO relocator_job', current_database()) \gexec
GRANT USAGE ON SCHEMA public TO relocator_job;
GRANT SELECT ON public.avatars TO relocator_job;
GRANT UPDATE ON public.avatars TO relocator_job;
-- Optional: lets `run --max-replica-lag` read the replicas' lag on the primary and the
-- run pause while autovacuum works on the table (without it: --replica-url, and no pause).
-- GRANT pg_monitor TO relocator_job;

CREATE SCHEMA IF NOT EXISTS relocator AUTHORIZATION relocator_job;
