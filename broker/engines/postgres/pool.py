"""The engine's connections: a small pool, checked before lending, and what their errors mean.

Every pooled connection runs in autocommit (each broker call is one
statement, so one transaction) within bounds that keep any one broker from
holding the database for long. :func:`lend` turns the database's errors into
the broker's own: unreachable is ``BrokerUnavailable`` (503, retry later),
anything else ``StorageFailed`` (its transaction rolled back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from typing import Any, Final

import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.engines.postgres import CONNECT_TIMEOUT
from broker.errors import BrokerUnavailable, StorageFailed

__all__ = ["Connection", "Pool", "lend", "open_pool"]

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]
Pool = ConnectionPool[Connection]

POOL_SIZE: Final = 8
"""Database connections per broker, besides the listener's: the broker's
threads (one per client connection) take turns on them."""
ACQUIRE_TIMEOUT: Final = 2.0
"""Longest a call waits for a pooled connection before answering BrokerUnavailable
(503): with the database down, clients hear so in two seconds, not in minutes."""
# Bounds for every pooled connection: no statement, lock wait or idle
# transaction holds the database for long, whatever goes wrong in a broker.
SESSION_OPTIONS: Final = (
    "-c statement_timeout=30s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s"
)
IDLE_CHECK_SECONDS: Final = 5.0
"""A pooled connection idle longer than this is checked (one round trip) before it is
lent: the database may have restarted meanwhile. One used more recently is lent as
it is; if it broke in between, its call answers 503 and the pool replaces it."""


def open_pool(conninfo: str) -> Pool:
    """The pool on ``conninfo``, open; JSON read with exact decimals."""
    loads = partial(json.loads, parse_float=Decimal)

    def configure(connection: Connection) -> None:
        set_json_loads(loads, connection)

    pool: Pool = ConnectionPool(
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
        timeout=ACQUIRE_TIMEOUT,
        name="formulary",
        open=True,
    )
    return pool


def check_if_idle(connection: Any) -> None:
    """The pool's ``check`` hook: an empty query, only for a connection idle a while."""
    returned = getattr(connection, "formulary_returned", None)
    if returned is None or time.monotonic() - returned > IDLE_CHECK_SECONDS:
        connection.execute("")


@contextlib.contextmanager
def lend(pool: Pool, passing: tuple[type[BaseException], ...] = ()) -> Iterator[Connection]:
    """A pooled connection, its database errors raised as the broker's own.

    ``passing`` names the errors the caller handles itself.
    """
    try:
        with pool.connection() as connection:
            try:
                yield connection
            finally:
                # For check_if_idle. Noted here rather than in the pool's reset
                # hook, which would hand every returned connection to a pool
                # thread: a thread switch per call, and the connection lent
                # again only once that thread has run.
                connection.formulary_returned = time.monotonic()  # type: ignore[attr-defined]
    except passing:
        raise
    except PoolTimeout as exc:
        raise BrokerUnavailable(f"no database connection: {exc}") from None
    except psycopg.OperationalError as exc:
        raise BrokerUnavailable(f"the database cannot be reached: {exc}") from None
    except psycopg.Error as exc:
        log.error("database error: %r", exc)
        raise StorageFailed(f"{type(exc).__name__}: {exc}") from None
