"""Creating and migrating the engine's schema when a broker starts.

Every broker runs this at start, in one transaction that holds an advisory
lock, so brokers starting together take turns: the first brings the schema
up to date, the others find it current. Two kinds of SQL, as Flyway has
versioned and repeatable migrations:

- ``migrations/NNNN_name.sql``, each applied once, in order, and recorded in
  ``formulary.schema_version``: tables, indexes, data;
- ``functions.sql``, applied after them whenever its checksum differs from
  the one recorded in ``formulary.schema_functions``: every function of the
  schema is dropped, then made again from the file.

A database whose schema is newer than this code knows is refused (an older
broker must not write to it), as is one that cannot be reached or locked in
time.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg

from broker.engines import EngineError
from broker.engines.postgres.sql import Functions, functions, migrations, query

log = logging.getLogger(__name__)

LOCK_KEY: Final = 0x466F726D756C  # "Formul": the advisory lock brokers take to migrate


def latest_version() -> int:
    return migrations()[-1].version


def migrate(
    connection: psycopg.Connection[tuple[Any, ...]], with_functions: Functions | None = None
) -> int:
    """Bring the schema to the latest version; returns the version found before.

    ``with_functions`` stands in for ``functions.sql`` (tests).
    """
    with connection.transaction():
        connection.execute(query("migration_lock_timeout"))
        connection.execute(query("migration_lock"), {"key": LOCK_KEY})
        for step in ("create_schema", "create_schema_version", "create_schema_functions"):
            connection.execute(query(step))
        row = connection.execute(query("schema_version")).fetchone()
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
                query("record_version"), {"version": migration.version, "name": migration.name}
            )
        _apply_functions(connection, with_functions or functions())
    return found


def _apply_functions(connection: psycopg.Connection[tuple[Any, ...]], wanted: Functions) -> None:
    """Make the schema's functions ``wanted``'s, unless the database has them already."""
    row = connection.execute(query("functions_checksum"), {"file": wanted.file}).fetchone()
    if row is not None and row[0] == wanted.checksum:
        return
    log.info("applying %s (checksum %s)", wanted.file, wanted.checksum[:12])
    connection.execute(query("drop_functions"))
    connection.execute(wanted.sql.encode("utf-8"))
    connection.execute(
        query("record_functions"), {"file": wanted.file, "checksum": wanted.checksum}
    )
