"""Creating and migrating the engine's schema when a broker starts.

Every broker runs this at start. One transaction holds an advisory lock, so
brokers starting together take turns: the first applies the missing
migrations, the others find the schema current. A database whose schema is
newer than this code knows is refused (an older broker must not write to
it), as is one that cannot be reached or locked in time.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg

from broker.engines import EngineError
from broker.engines.postgres.sql import migrations

log = logging.getLogger(__name__)

SCHEMA: Final = "formulary"
LOCK_KEY: Final = 0x466F726D756C  # "Formul": the advisory lock brokers take to migrate
LOCK_TIMEOUT: Final = "60s"


def latest_version() -> int:
    return migrations()[-1].version


def migrate(connection: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Bring the schema to the latest version; returns the version found before."""
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        connection.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = connection.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > latest_version():
            raise EngineError(
                f"the database's Formulary schema is version {found}, newer than this "
                f"Formulary knows (version {latest_version()}): upgrade Formulary, "
                "or point FORMULARY_DATA at another database"
            )
        for migration in migrations()[found:]:
            log.info(
                "migrating the database schema to version %d (%s)",
                migration.version,
                migration.name,
            )
            connection.execute(migration.sql.encode("utf-8"))
            connection.execute(
                f"INSERT INTO {SCHEMA}.schema_version (version, name) VALUES (%s, %s)",
                [migration.version, migration.name],
            )
    return found
