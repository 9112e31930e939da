"""The PostgreSQL engine: every piece of state in one database, shared by brokers on many hosts.

Each host runs its own broker process against the same database; the API
and the workers on that host talk to it exactly as to the embedded engine.
``service`` is the engine's face, ``convert`` turns its rows into the
interface's values, ``pool`` lends it connections; the SQL (migrations, the
functions that make each atomic step, the named queries) is in ``sql/``;
``schema`` migrates at start; ``wakeups`` carries long polls across hosts.

Needs the ``postgres`` extra (psycopg 3 and psycopg_pool).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from broker.engines import EngineError
from broker.settings import Settings

__all__ = ["open_postgres"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 5


def open_postgres(settings: Settings) -> Any:
    """The engine on the database ``settings.data`` names, schema migrated; ``EngineError``."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401  (imported here to give the message below)
    except ImportError:
        raise EngineError(
            "FORMULARY_DATA names a PostgreSQL database, but psycopg is not installed: "
            "pip install 'formulary[postgres]'"
        ) from None

    from broker.engines.postgres.pool import open_pool
    from broker.engines.postgres.schema import migrate
    from broker.engines.postgres.service import PostgresBroker
    from broker.engines.postgres.wakeups import Wakeups

    conninfo = settings.data
    where = describe(conninfo)
    check_uri(conninfo)
    try:
        with psycopg.connect(
            conninfo, connect_timeout=CONNECT_TIMEOUT, application_name="formulary-broker"
        ) as connection:
            found = migrate(connection)
    except psycopg.Error as exc:
        raise EngineError(f"cannot use the database {where}: {exc}".strip()) from None
    pool = open_pool(conninfo)
    broker: PostgresBroker | None = None
    wakeups = Wakeups(conninfo, on_tick=lambda: broker.sweep() if broker else None)
    broker = PostgresBroker(pool, wakeups, settings)
    log.info("engine: PostgreSQL at %s (schema was version %d)", where, found)
    return broker


def check_uri(conninfo: str) -> None:
    """``EngineError`` for a URI libpq cannot read, or one that holds a password."""
    import psycopg

    try:
        parsed = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise EngineError(f"not a valid PostgreSQL URI: {exc}") from None
    if parsed.get("password"):
        raise EngineError(
            "the URI holds a password: give it through PGPASSWORD or ~/.pgpass "
            "instead, so that it never shows in process lists or logs"
        )


def describe(conninfo: str) -> str:
    """``user@host:port/dbname`` for logs: never a password."""
    try:
        import psycopg

        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except Exception:
        return "(unparsable URI)"
    user = parts.get("user") or ""
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"{user}{'@' if user else ''}{host}:{port}/{parts.get('dbname') or ''}"
