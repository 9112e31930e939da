"""The PostgreSQL engine's side of a copy (``broker.migrate``): one database, read or filled.

Reading runs in one REPEATABLE READ, READ ONLY transaction, held from open
to close: every count and every record comes from one snapshot, even were a
broker still writing (they should be stopped: what they write after the
snapshot is not copied). Rows stream through server-side cursors, a batch at
a time. The source's schema is only read: it must be this Formulary's.

Filling runs the schema migration first (as a starting broker does), then
one transaction: lock the tables, check that they are empty, ``COPY`` the
formulas, the idempotency keys, the messages and the API keys in, give the
dead letters their times, and set the counters. Every live message is ready at once, its delivery
count kept; fresh messages and redeliveries keep their source order.

The statements are in ``sql/portable.sql``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from broker.engines import EngineError, portable
from broker.engines.postgres import CONNECT_TIMEOUT, check_uri, describe
from broker.engines.postgres.schema import latest_version, migrate
from broker.engines.postgres.sql import query

__all__ = ["PostgresPortable", "open_source", "open_target"]

log = logging.getLogger(__name__)

APPLICATION_NAME: Final = "formulary-migrate"

Connection = psycopg.Connection[tuple[Any, ...]]


def open_source(conninfo: str) -> PostgresPortable:
    """The database to copy from, in its snapshot; ``EngineError`` if it holds no Formulary."""
    where = describe(conninfo)
    connection = _connect(conninfo, where)
    try:
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        row = connection.execute(query("schema_found")).fetchone()
        found = None if row is None else row[0]
        if found is None:
            raise EngineError(f"the database {where} holds no Formulary schema: nothing to copy")
        if found != latest_version():
            raise EngineError(
                f"the database {where} has Formulary schema version {found}, this Formulary "
                f"reads version {latest_version()}: "
                + (
                    "upgrade Formulary"
                    if found > latest_version()
                    else "start this version's broker on it once to migrate it"
                )
            )
    except psycopg.Error as exc:
        connection.close()
        raise EngineError(f"cannot read the database {where}: {exc}".strip()) from None
    except BaseException:
        connection.close()
        raise
    return PostgresPortable(connection, where)


def open_target(conninfo: str) -> PostgresPortable:
    """The database to copy into, its schema created or migrated to this Formulary's."""
    where = describe(conninfo)
    connection = _connect(conninfo, where)
    try:
        connection.autocommit = True  # every step below is an explicit transaction
        migrate(connection)
    except psycopg.Error as exc:
        connection.close()
        raise EngineError(f"cannot use the database {where}: {exc}".strip()) from None
    except BaseException:
        connection.close()
        raise
    return PostgresPortable(connection, where)


def _connect(conninfo: str, where: str) -> Connection:
    check_uri(conninfo)
    try:
        return psycopg.connect(
            conninfo, connect_timeout=CONNECT_TIMEOUT, application_name=APPLICATION_NAME
        )
    except psycopg.Error as exc:
        raise EngineError(f"cannot connect to the database {where}: {exc}".strip()) from None


class PostgresPortable:
    """One connection to the database: its snapshot (a source) or its import (a target)."""

    def __init__(self, connection: Connection, where: str) -> None:
        self._connection = connection
        self.where = where

    def close(self) -> None:
        # A source's read-only transaction is rolled back: nothing to keep.
        self._connection.close()

    def holdings(self) -> portable.Holdings:
        try:
            with self._connection.cursor() as cursor:
                return _holdings(cursor)
        except psycopg.Error as exc:
            raise EngineError(f"cannot read the database {self.where}: {exc}") from None

    # -- reading ---------------------------------------------------------------------

    def formulas(self, batch: int) -> Iterator[list[portable.FormulaState]]:
        for rows in self._stream("export_formulas", batch):
            # The columns are FormulaState's fields, in order; materials as JSON text.
            yield [
                portable.FormulaState(formula_id, name, _unpack(materials), *rest)
                for formula_id, name, materials, *rest in rows
            ]

    def keys(self, batch: int) -> Iterator[list[portable.KeyState]]:
        for rows in self._stream("export_keys", batch):
            yield [portable.KeyState(*row) for row in rows]

    def messages(self, batch: int) -> Iterator[list[portable.MessageState]]:
        for rows in self._stream("export_messages", batch):
            yield [portable.MessageState(*row) for row in rows]

    def api_keys(self, batch: int) -> Iterator[list[portable.ApiKeyState]]:
        for rows in self._stream("export_api_keys", batch):
            yield [
                portable.ApiKeyState(key_id, name, tuple(scopes), digest, created_at, revoked_at)
                for key_id, name, scopes, digest, created_at, revoked_at in rows
            ]

    def _stream(self, name: str, batch: int) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of query ``name``, ``batch`` at a time, through a server-side cursor."""
        try:
            with self._connection.cursor(name=f"formulary_{name}") as cursor:
                cursor.execute(query(name))
                while rows := cursor.fetchmany(batch):
                    yield rows
        except psycopg.Error as exc:
            raise EngineError(f"cannot read the database {self.where}: {exc}") from None

    # -- filling -------------------------------------------------------------------------

    def import_all(self, records: portable.Records) -> None:
        connection = self._connection
        try:
            with connection.transaction(), connection.cursor() as cursor:
                for step in ("import_without_timeout", "import_lock_timeout", "import_lock"):
                    cursor.execute(query(step))
                _holdings(cursor).require_empty(self.where)
                now = _scalar(cursor, "import_time")
                _copy(
                    cursor, "import_formulas", (self._row(f) for b in records.formulas for f in b)
                )
                _copy(
                    cursor,
                    "import_keys",
                    (
                        (
                            k.owner,
                            k.key,
                            k.body_digest,
                            k.formula_id,
                            k.duplicate,
                            _moment(k.expires_at),
                        )
                        for batch in records.keys
                        for k in batch
                    ),
                )
                _copy(
                    cursor,
                    "import_messages",
                    (
                        (
                            m.message_id,
                            m.formula_id,
                            m.fingerprint,
                            "dead" if m.dead else "ready",
                            now,
                            m.deliveries,
                            now if m.dead else None,
                        )
                        for batch in records.messages
                        for m in batch
                    ),
                )
                _copy(
                    cursor,
                    "import_api_keys",
                    (
                        (
                            k.key_id,
                            k.name,
                            list(k.scopes),
                            k.secret_digest,
                            _moment(k.created_at),
                            None if k.revoked_at is None else _moment(k.revoked_at),
                        )
                        for batch in records.api_keys
                        for k in batch
                    ),
                )
                cursor.execute(query("import_dead_letter_times"))
                cursor.execute(query("import_counters"))
        except psycopg.Error as exc:
            raise EngineError(
                f"the copy into {self.where} failed and was rolled back: {exc}".strip()
            ) from None

    def _row(self, f: portable.FormulaState) -> tuple[Any, ...]:
        """A formula as ``import_formulas`` takes it."""
        return (
            f.formula_id,
            f.name,
            _pack(f.materials, self.where),
            f.fingerprint,
            f.message_id,
            _moment(f.created_at),
            f.deliveries,
            None if f.processed_at is None else _moment(f.processed_at),
            f.summary_json,
        )


def _copy(cursor: psycopg.Cursor[tuple[Any, ...]], name: str, rows: Iterable[Any]) -> None:
    """``COPY ... FROM STDIN`` (the statement ``name``) with ``rows``, as they come."""
    with cursor.copy(query(name)) as copy:
        for row in rows:
            copy.write_row(row)


def _holdings(cursor: psycopg.Cursor[tuple[Any, ...]]) -> portable.Holdings:
    row = cursor.execute(query("holdings")).fetchone()
    assert row is not None
    return portable.Holdings(*row)  # the columns are Holdings' fields, in order


def _scalar(cursor: psycopg.Cursor[tuple[Any, ...]], name: str) -> Any:
    row = cursor.execute(query(name)).fetchone()
    return None if row is None else row[0]


def _unpack(materials: str) -> tuple[tuple[str, str], ...]:
    """The materials column's JSON text as (name, decimal text) pairs, digits as stored."""
    data = json.loads(materials, parse_float=str, parse_int=str)
    return tuple((m["name"], m["concentration"]) for m in data)


def _pack(materials: Sequence[tuple[str, str]], where: str) -> str:
    """(name, decimal text) pairs as the materials column's JSON text, digits as given."""
    for _, concentration in materials:
        if not _JSON_NUMBER.fullmatch(concentration):
            raise EngineError(
                f"cannot copy into {where}: a concentration reads {concentration!r}, "
                "not a decimal number"
            )
    return (
        "["
        + ",".join(
            [f'{{"name":{_quote(name)},"concentration":{number}}}' for name, number in materials]
        )
        + "]"
    )


_quote = json.JSONEncoder().encode
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _moment(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC)
