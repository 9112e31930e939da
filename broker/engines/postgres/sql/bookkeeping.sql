-- What the migration runner (schema.py) runs around the migrations and
-- functions.sql, all in one transaction: its lock, and the two tables in which
-- it records what the database has. Named as in queries.sql.

-- name: migration_lock_timeout
SET LOCAL lock_timeout = '60s';

-- name: migration_lock
-- Brokers starting together take turns here: the first migrates, the others
-- then find the schema current.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS formulary;

-- name: create_schema_version
-- One row per versioned migration applied.
CREATE TABLE IF NOT EXISTS formulary.schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: create_schema_functions
-- The checksum of the functions.sql the database's functions came from.
CREATE TABLE IF NOT EXISTS formulary.schema_functions (
    file       text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: schema_version
SELECT max(v.version) FROM formulary.schema_version v;

-- name: record_version
INSERT INTO formulary.schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: functions_checksum
SELECT f.checksum FROM formulary.schema_functions f WHERE f.file = %(file)s;

-- name: drop_functions
-- Every function of the schema, whatever its arguments: functions.sql then
-- makes the ones that exist now.
DO $$
DECLARE
    v_routine record;
BEGIN
    FOR v_routine IN
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments
          FROM pg_proc p
         WHERE p.pronamespace = 'formulary'::regnamespace
    LOOP
        EXECUTE format('DROP ROUTINE formulary.%I(%s)', v_routine.proname, v_routine.arguments);
    END LOOP;
END;
$$;

-- name: record_functions
INSERT INTO formulary.schema_functions AS f (file, checksum) VALUES (%(file)s, %(checksum)s)
ON CONFLICT (file) DO UPDATE SET checksum = excluded.checksum, applied_at = now();
