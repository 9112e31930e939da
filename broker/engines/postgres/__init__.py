"""The PostgreSQL engine: every piece of state in one database, shared by brokers on many hosts.

Each host runs its own broker process against the same database; the API
and the workers on that host talk to it exactly as to the embedded engine.
``service`` is the engine's face; the SQL (schema, migrations, the functions
that make each atomic step, the named queries) is in ``sql/``; ``schema``
migrates at start; ``wakeups`` carries long polls across hosts.

Needs the ``postgres`` extra (psycopg 3 and psycopg_pool).
"""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal
from functools import partial
from typing import Any, Final

from broker.engines import EngineError
from broker.settings import Settings

__all__ = ["open_postgres"]

log = logging.getLogger(__name__)

POOL_SIZE: Final = 8
"""Database connections per broker, besides the listener's: the broker's
threads (one per client connection) take turns on them."""
CONNECT_TIMEOUT: Final = 5
ACQUIRE_TIMEOUT: Final = 2.0
"""Longest a call waits for a pooled connection before answering BrokerUnavailable
(503): with the database down, clients hear so in two seconds, not in minutes."""
# Bounds for every pooled connection: no statement, lock wait or idle
# transaction holds the database for long, whatever goes wrong in a broker.
SESSION_OPTIONS: Final = (
    "-c statement_timeout=30s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s"
)


def open_postgres(settings: Settings) -> Any:
    """The engine on the database ``settings.data`` names, schema migrated; ``EngineError``."""
    try:
        import psycopg
        from psycopg.types.json import set_json_loads
        from psycopg_pool import ConnectionPool
    except ImportError:
        raise EngineError(
            "FORMULARY_DATA names a PostgreSQL database, but psycopg is not installed: "
            "pip install 'formulary[postgres]'"
        ) from None

    from broker.engines.postgres.schema import migrate
    from broker.engines.postgres.service import PostgresBroker
    from broker.engines.postgres.wakeups import Wakeups

    conninfo = settings.data
    where = describe(conninfo)
    check_uri(conninfo)
    loads = partial(json.loads, parse_float=Decimal)

    def configure(connection: Any) -> None:
        set_json_loads(loads, connection)

    try:
        with psycopg.connect(
            conninfo, connect_timeout=CONNECT_TIMEOUT, application_name="formulary-broker"
        ) as connection:
            found = migrate(connection)
    except psycopg.Error as exc:
        raise EngineError(f"cannot use the database {where}: {exc}".strip()) from None
    pool: Any = ConnectionPool(
        conninfo,
        min_size=2,
        max_size=POOL_SIZE,
        kwargs={
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "formulary-broker",
            "options": SESSION_OPTIONS,
        },
        configure=configure,
        check=check_if_idle,
        reset=mark_returned,
        timeout=ACQUIRE_TIMEOUT,
        name="formulary",
        open=True,
    )
    broker: PostgresBroker | None = None
    wakeups = Wakeups(conninfo, on_tick=lambda: broker.sweep() if broker else None)
    broker = PostgresBroker(
        pool,
        wakeups,
        queue_capacity=settings.queue_capacity,
        visibility_timeout=settings.visibility_timeout,
        max_deliveries=settings.max_deliveries,
        idempotency_ttl=settings.idempotency_ttl,
        rate_limit=settings.rate_limit,
    )
    log.info("engine: PostgreSQL at %s (schema was version %d)", where, found)
    return broker


IDLE_CHECK_SECONDS: Final = 5.0
"""A pooled connection idle longer than this is checked (one round trip) before it is
lent: the database may have restarted meanwhile. One used more recently is lent as
it is; if it broke in between, its call answers 503 and the pool replaces it."""


def mark_returned(connection: Any) -> None:
    """The pool's ``reset`` hook: note when the connection came back."""
    connection.formulary_returned = time.monotonic()


def check_if_idle(connection: Any) -> None:
    """The pool's ``check`` hook: an empty query, only for a connection idle a while."""
    returned = getattr(connection, "formulary_returned", None)
    if returned is None or time.monotonic() - returned > IDLE_CHECK_SECONDS:
        connection.execute("")


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
