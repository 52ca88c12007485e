-- Least-privilege PostgreSQL roles for walletq. Run with psql as a superuser, connected to
-- the walletq database, twice: once before `walletq migrate` (roles, ownership) and once
-- after it, and after every later migration (table grants; tables that don't exist yet
-- are skipped). Idempotent.
--
--   createdb walletq
--   psql -d walletq -v migrator_password="$MIGRATOR_PW" -v worker_password="$WORKER_PW" -f deploy/postgres/roles.sql
--   DATABASE_URL=postgres://walletq_migrator:...@host/walletq walletq migrate
--   psql -d walletq -f deploy/postgres/roles.sql
--   DATABASE_URL=postgres://walletq_worker:...@host/walletq walletq worker --no-migrate
--   DATABASE_URL=postgres://walletq_gateway:...@host/walletq walletq gateway --no-migrate
--
-- Role names can be changed with -v migrator_role=... -v worker_role=... -v gateway_role=...
-- (passwords with -v gateway_password=...).
--
-- walletq_migrator owns the database, its public schema and every table: the only role
-- that runs DDL. walletq_worker can read and write exactly what a batch, `status`,
-- `balance` and `audit` need; it can never DELETE, TRUNCATE or ALTER anything, nor UPDATE
-- the append-only tables (requests, ledger_entries, coupons). walletq_gateway only reads
-- what the HTTP gateway shows: results (requests), wallets and coupons.
\set ON_ERROR_STOP on
\if :{?migrator_role}
\else
\set migrator_role walletq_migrator
\endif
\if :{?worker_role}
\else
\set worker_role walletq_worker
\endif
\if :{?gateway_role}
\else
\set gateway_role walletq_gateway
\endif

SELECT format('CREATE ROLE %I LOGIN', :'migrator_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'migrator_role') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'worker_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'worker_role') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'gateway_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'gateway_role') \gexec
\if :{?migrator_password}
ALTER ROLE :"migrator_role" PASSWORD :'migrator_password';
\endif
\if :{?worker_password}
ALTER ROLE :"worker_role" PASSWORD :'worker_password';
\endif
\if :{?gateway_password}
ALTER ROLE :"gateway_role" PASSWORD :'gateway_password';
\endif
ALTER ROLE :"migrator_role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE :"worker_role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 256;
-- Server-side bounds on every worker session (see docs/LIMITS.md).
ALTER ROLE :"worker_role" SET statement_timeout = '30s';
ALTER ROLE :"worker_role" SET idle_in_transaction_session_timeout = '60s';
ALTER ROLE :"gateway_role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 256;
ALTER ROLE :"gateway_role" SET statement_timeout = '30s';
ALTER ROLE :"gateway_role" SET default_transaction_read_only = on;

-- The migrator owns the database and the schema; nobody else may create objects in it.
SELECT format('ALTER DATABASE %I OWNER TO %I', current_database(), :'migrator_role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r)
  FROM unnest(ARRAY[:'worker_role', :'gateway_role']) AS r \gexec
ALTER SCHEMA public OWNER TO :"migrator_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM :"worker_role", :"gateway_role";
GRANT USAGE ON SCHEMA public TO :"worker_role", :"gateway_role";

-- Table grants, exactly: first take everything away, then give back what is needed.
SELECT format('REVOKE ALL ON TABLE %I FROM %I', t, r)
  FROM unnest(ARRAY['wallets', 'user_fences', 'holds', 'limit_usage', 'wallet_limits', 'wallet_limit_changes', 'requests',
                    'ledger_entries', 'coupons', 'partition_cursors', '_sqlx_migrations']) AS t,
       unnest(ARRAY[:'worker_role', :'gateway_role']) AS r
 WHERE to_regclass(t) IS NOT NULL \gexec
-- Upserted by every batch (a hold is inserted once, then closed once).
SELECT format('GRANT SELECT, INSERT, UPDATE ON TABLE %I TO %I', t, :'worker_role')
  FROM unnest(ARRAY['wallets', 'user_fences', 'holds', 'limit_usage', 'partition_cursors']) AS t
 WHERE to_regclass(t) IS NOT NULL \gexec
-- Append-only: read and insert, never update or delete.
SELECT format('GRANT SELECT, INSERT ON TABLE %I TO %I', t, :'worker_role')
  FROM unnest(ARRAY['requests', 'ledger_entries', 'coupons']) AS t
 WHERE to_regclass(t) IS NOT NULL \gexec
-- `--no-migrate` checks that the schema is at the version the binary expects; the limits
-- are read by every batch but set only by an operator with the owner's role
-- (`walletq limits set`), never by a worker, a producer or a gateway user.
SELECT format('GRANT SELECT ON TABLE %I TO %I', t, :'worker_role')
  FROM unnest(ARRAY['_sqlx_migrations', 'wallet_limits', 'wallet_limit_changes']) AS t
 WHERE to_regclass(t) IS NOT NULL \gexec
SELECT format('GRANT USAGE ON SEQUENCE %I TO %I', s, :'worker_role')
  FROM unnest(ARRAY['ledger_entries_entry_id_seq', 'router_epochs']) AS s
 WHERE to_regclass(s) IS NOT NULL \gexec
-- The gateway reads results, wallets with their holds, limits and usage, and coupons, and
-- checks the schema version.
SELECT format('GRANT SELECT ON TABLE %I TO %I', t, :'gateway_role')
  FROM unnest(ARRAY['requests', 'wallets', 'holds', 'wallet_limits', 'limit_usage', 'coupons', '_sqlx_migrations']) AS t
 WHERE to_regclass(t) IS NOT NULL \gexec
