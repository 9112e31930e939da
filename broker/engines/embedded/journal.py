"""The journal: every change to the broker's state, kept in an embedded SQLite file.

The engine keeps its state in memory and hands each atomic step's changes
(``changes``) to :meth:`Journal.write` as one list, under its own
lock; :meth:`Journal.load` gives everything back on start.
:class:`SqliteJournal` writes a WAL-mode file through the stdlib ``sqlite3``;
:class:`MemoryJournal` (``FORMULARY_DATA=:memory:``) writes nothing.

What survives what, with the ``synchronous`` setting chosen at open:

* ``FULL`` (the default): every transaction whose ``write`` returned survives
  a process crash (SIGKILL at any instant), an OS crash and a power loss. The
  WAL is fsynced at each commit, which bounds throughput to the disk's flush
  rate (the broker may batch changes into fewer, larger writes).
* ``NORMAL``: every returned ``write`` survives a process crash; an OS crash or
  a power loss may roll back the most recent transactions (never a partial
  one: the file stays consistent).
* ``OFF``: survives a process crash only; a power loss may corrupt the file.

A transaction is all or nothing in every case. The file is opened in exclusive
locking mode and the write lock is held until :meth:`SqliteJournal.close`, so a
second broker on the same file is refused instead of splitting the state.

Schema (version 3, ``PRAGMA user_version``; ``MIGRATIONS`` brings older
files forward): ``formulas`` in submit order (``seq``), with materials as the
record's packed ``name<TAB>decimal<TAB>...`` text (``store.pack_materials``)
and the summary as JSON whose numbers are exact decimals (whole numbers come
back as ``int``); ``messages`` whose ``ord`` (the rowid) is bumped on bury
and redrive, so one scan in rowid order yields the fresh FIFO, redriven
messages after it and dead letters oldest first; ``keys`` in the order
recorded, each naming the formula its answer named and the API key that
owns it (``''`` with ``FORMULARY_AUTH=off``); ``api_keys`` in the order made,
each with its scopes (comma-separated), its secret's digest (never the
secret) and its times.

Costs: ``write`` is O(log n) per change (``ForgetKeys`` adds O(k) for the k
keys dropped) plus one commit, whose fsync dominates with ``FULL``. ``open``
runs ``PRAGMA quick_check``, O(file size). ``load`` is one sequential scan
per table, O(n), with no per-row queries and no decoding of materials.
Measured figures are in ``bench/README.md``.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from broker.engines import EngineError
from broker.engines.embedded.apikeys import ApiKeyRecord
from broker.engines.embedded.changes import (
    BuryMessage,
    Change,
    CountDelivery,
    CreateApiKey,
    DeleteMessage,
    ForgetKeys,
    RecordResult,
    Recovered,
    RecoveredMessage,
    RedriveMessage,
    RememberKey,
    RevokeApiKey,
    StoreFormula,
)
from broker.engines.embedded.idempotency import Remembered
from broker.engines.embedded.store import FormulaRecord

log = logging.getLogger(__name__)

__all__ = [
    "Journal",
    "JournalError",
    "MemoryJournal",
    "SqliteJournal",
    "open_journal",
]

MEMORY: Final = ":memory:"


class JournalError(EngineError):
    """The journal file cannot be used; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class Journal(Protocol):
    """What the broker needs from a journal. Used by one thread at a time."""

    def load(self) -> Recovered:
        """Everything written so far."""

    def write(self, changes: Sequence[Change]) -> None:
        """Apply ``changes`` in order as one transaction, or none of them and raise."""

    def close(self) -> None:
        """Release the file; safe to call twice."""


class MemoryJournal:
    """No file: writes nothing, recovers nothing (tests and throwaway runs)."""

    def load(self) -> Recovered:
        return Recovered([], [], [])

    def write(self, changes: Sequence[Change]) -> None:
        pass

    def close(self) -> None:
        pass


def open_journal(data: str) -> Journal:
    """The journal ``FORMULARY_DATA`` names: ``:memory:`` or a file path."""
    if data == MEMORY:
        return MemoryJournal()
    return SqliteJournal(data)


# -- schema ----------------------------------------------------------------------

_SCHEMA_V1 = (
    # seq is the rowid: submit order is the table's own order.
    """CREATE TABLE formulas (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        materials TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        message_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        deliveries INTEGER NOT NULL,
        processed_at REAL,
        summary TEXT
    )""",
    # ord is the rowid: moving a message to the back is giving it a new rowid.
    """CREATE TABLE messages (
        ord INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL UNIQUE,
        formula_id TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        dead INTEGER NOT NULL
    )""",
    # A key may be recorded again after it expired, so key is not unique here.
    """CREATE TABLE keys (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        body_digest TEXT NOT NULL,
        expires_at REAL NOT NULL,
        outcome TEXT NOT NULL
    )""",
    "CREATE INDEX keys_by_expiry ON keys (expires_at)",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _keys_name_their_formula(conn: sqlite3.Connection) -> None:
    """v1 -> v2: a key keeps the id of the formula its answer named, not the whole answer."""
    conn.execute(
        """CREATE TABLE keys_v2 (
            seq INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            body_digest TEXT NOT NULL,
            expires_at REAL NOT NULL,
            formula_id TEXT NOT NULL,
            duplicate INTEGER NOT NULL
        )"""
    )
    rows = []
    for seq, key, digest, expires_at, outcome in conn.execute(
        "SELECT seq, key, body_digest, expires_at, outcome FROM keys ORDER BY seq"
    ):
        answer = json.loads(outcome)
        duplicate = answer["kind"] == "duplicate"
        formula_id = answer["existing_id"] if duplicate else answer["formula"]["id"]
        rows.append((seq, key, digest, expires_at, formula_id, int(duplicate)))
    conn.executemany("INSERT INTO keys_v2 VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.execute("DROP TABLE keys")
    conn.execute("ALTER TABLE keys_v2 RENAME TO keys")
    conn.execute("CREATE INDEX keys_by_expiry ON keys (expires_at)")


def _api_keys(conn: sqlite3.Connection) -> None:
    """v2 -> v3: API keys, and each idempotency key's owner (``''``: no API key)."""
    # The rowid keeps the order the keys were made in.
    conn.execute(
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            scopes TEXT NOT NULL,
            secret_digest TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        )"""
    )
    conn.execute("ALTER TABLE keys ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _create_v1,
    1: _keys_name_their_formula,
    2: _api_keys,
}
"""``{version: step}``: each step turns a file of that version into the next one."""

_TABLES = frozenset({"formulas", "messages", "keys"})
_TABLES_SINCE: dict[int, frozenset[str]] = {3: frozenset({"api_keys"})}
"""Tables a file of that version or later must have, beyond ``_TABLES``."""
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

_INSERT_FORMULA = (
    "INSERT INTO formulas (id, name, materials, fingerprint, message_id, created_at,"
    " deliveries, processed_at, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (message_id, formula_id, deliveries, dead) VALUES (?, ?, 0, 0)"
)
_INSERT_KEY = (
    "INSERT INTO keys (key, body_digest, expires_at, formula_id, duplicate, owner)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_COUNT_MESSAGE = "UPDATE messages SET deliveries = ? WHERE message_id = ?"
_COUNT_FORMULA = "UPDATE formulas SET deliveries = ? WHERE id = ?"
_RECORD_RESULT = (
    "UPDATE formulas SET processed_at = ?, summary = ? WHERE id = ? AND processed_at IS NULL"
)
_DELETE_MESSAGE = "DELETE FROM messages WHERE message_id = ?"
# Evaluated per row, so an executemany gives each message the next position.
_BURY = (
    "UPDATE messages SET dead = 1, ord = (SELECT MAX(ord) FROM messages) + 1 WHERE message_id = ?"
)
_REDRIVE = (
    "UPDATE messages SET dead = 0, deliveries = 0, ord = (SELECT MAX(ord) FROM messages) + 1"
    " WHERE message_id = ?"
)
_FORGET_KEYS = "DELETE FROM keys WHERE expires_at <= ?"
_INSERT_API_KEY = (
    "INSERT INTO api_keys (id, name, scopes, secret_digest, created_at, revoked_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_REVOKE_API_KEY = "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"


# -- the SQLite journal ---------------------------------------------------------------


class SqliteJournal:
    """The journal in a WAL-mode SQLite file, created on first use.

    Opening never starts afresh over existing data: a file it cannot read or
    write, one that is not SQLite, a corrupt one (``PRAGMA quick_check``), an
    SQLite file of another program, one of a newer schema, or one held by
    another broker (after waiting ``lock_timeout`` seconds) raises
    JournalError, and the file is left as it was.
    """

    SCHEMA_VERSION = 3

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", lock_timeout: float = 2.0
    ) -> None:
        level = synchronous.upper()
        if level not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        _prepare_file(self.path)
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from exc
        try:
            self._open(conn, level)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _open(self, conn: sqlite3.Connection, synchronous: str) -> None:
        """Check the file without changing it, then switch to WAL and migrate."""
        try:
            # Before the first read: no shared-memory index is made, and every
            # lock taken is kept until close.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            version = _scalar(conn, "PRAGMA user_version")
            self._check(conn, version)
            mode = _scalar(conn, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise JournalError(
                    f"the journal {self.path} cannot use write-ahead logging "
                    f"(journal mode stays {mode!r}); put it on a local file system"
                )
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._migrate(conn, version)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from exc

    def _check(self, conn: sqlite3.Connection, version: int) -> None:
        """Refuse a file that is not a healthy journal this version can use (reads only)."""
        if version > self.SCHEMA_VERSION:
            raise JournalError(
                f"the journal {self.path} was written by a newer Formulary "
                f"(schema {version} > {self.SCHEMA_VERSION}); upgrade Formulary, "
                "or point FORMULARY_DATA at another file"
            )
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if version == 0 and tables:
            raise JournalError(
                f"{self.path} is an SQLite database of another program, not a "
                "Formulary journal; point FORMULARY_DATA at another file"
            )
        expected = _TABLES.union(
            *(names for since, names in _TABLES_SINCE.items() if version >= since)
        )
        missing = expected - tables
        if version and missing:
            raise JournalError(
                f"the journal {self.path} says schema {version} but lacks tables "
                f"{sorted(missing)}; restore it from a backup"
            )
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise JournalError(
                f"the journal {self.path} is corrupt ({'; '.join(problems[:3])}); "
                "restore it from a backup or move it aside (nothing was changed)"
            )

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring the file to SCHEMA_VERSION, every step in one transaction."""
        # BEGIN IMMEDIATE takes the write lock now, and exclusive mode keeps it
        # until close, even when there is nothing to migrate.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version < self.SCHEMA_VERSION:
                log.info("journal %s: schema %d -> %d", self.path, version, self.SCHEMA_VERSION)
            while version < self.SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"the journal {self.path} is closed")
        return self._conn

    def close(self) -> None:
        """Checkpoint the WAL into the file and close it, releasing the lock."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def write(self, changes: Sequence[Change]) -> None:
        """Apply ``changes`` in order, in one transaction.

        Raises JournalError (with the cause attached) and changes nothing if
        any change cannot be applied: a formula id stored twice, a string
        SQLite cannot hold, a full disk. Each run of changes of one kind is one
        ``executemany`` per table.
        """
        if not changes:
            return
        conn = self._connection()
        try:
            steps = _plan(changes)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"cannot journal these changes: {exc}") from exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, rows in steps:
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException as exc:
            self._roll_back(conn)
            # ValueError: a string SQLite cannot store (a lone surrogate).
            if isinstance(exc, sqlite3.Error | ValueError):
                raise JournalError(f"could not write to the journal {self.path}: {exc}") from exc
            raise

    def write_batches(self, batches: Iterable[Sequence[Change]]) -> None:
        """Apply every batch of changes in order, all in one transaction.

        For a bulk import (``broker.migrate``): ``batches`` may be a generator,
        so the caller sees progress between batches and never holds them all.
        All or nothing as ``write``; an exception raised while producing a
        batch rolls everything back and propagates as it is.
        """
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for changes in batches:
                for sql, rows in _plan(changes):
                    conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException as exc:
            self._roll_back(conn)
            # ValueError: a string SQLite cannot store (a lone surrogate).
            if isinstance(exc, sqlite3.Error | ValueError):
                raise JournalError(f"could not write to the journal {self.path}: {exc}") from exc
            raise

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The error being raised matters more; SQLite rolls back by itself
            # on the next open, since nothing was committed.
            log.exception("could not roll back a failed write to the journal %s", self.path)

    def load(self) -> Recovered:
        """Everything written, rebuilt with one scan of each table.

        The cyclic garbage collector is paused meanwhile: the millions of new
        objects would otherwise set off repeated full collections, for a third
        of the time.
        """
        conn = self._connection()
        collecting = gc.isenabled()
        gc.disable()
        try:
            formulas, fingerprints = _load_formulas(conn)
            messages = _load_messages(conn, fingerprints)
            keys = [
                Remembered(key, digest, formula_id, bool(duplicate), expires_at, owner)
                for key, digest, expires_at, formula_id, duplicate, owner in conn.execute(
                    "SELECT key, body_digest, expires_at, formula_id, duplicate, owner"
                    " FROM keys ORDER BY seq"
                )
            ]
            api_keys = [
                ApiKeyRecord(key_id, name, _split_scopes(scopes), digest, created_at, revoked_at)
                for key_id, name, scopes, digest, created_at, revoked_at in conn.execute(
                    "SELECT id, name, scopes, secret_digest, created_at, revoked_at"
                    " FROM api_keys ORDER BY rowid"
                )
            ]
        except sqlite3.Error as exc:
            raise JournalError(f"could not read the journal {self.path}: {exc}") from exc
        except (LookupError, TypeError, ValueError, ArithmeticError) as exc:
            raise JournalError(
                f"the journal {self.path} holds a record this Formulary cannot read "
                f"({exc!r}); restore it from a backup"
            ) from exc
        finally:
            if collecting:
                gc.enable()
        return Recovered(formulas, messages, keys, api_keys)


def _load_formulas(conn: sqlite3.Connection) -> tuple[list[FormulaRecord], dict[str, str]]:
    """Every formula in submit order, and each one's fingerprint by id (for messages).

    The materials column is the record's packed form, taken as it is: nothing
    is decoded per material, which keeps a million-formula load to seconds.
    """
    formulas: list[FormulaRecord] = []
    append = formulas.append
    fingerprints: dict[str, str] = {}
    cursor = conn.execute(
        "SELECT id, name, materials, fingerprint, message_id, created_at,"
        " deliveries, processed_at, summary FROM formulas ORDER BY seq"
    )
    for row in cursor:
        fingerprints[row[0]] = row[3]
        append(
            # The columns are FormulaRecord's parameters, in order.
            FormulaRecord(*row)
        )
    return formulas, fingerprints


def _load_messages(
    conn: sqlite3.Connection, fingerprints: Mapping[str, str]
) -> list[RecoveredMessage]:
    """Live messages in queue order, then dead letters oldest first."""
    make = RecoveredMessage
    live: list[RecoveredMessage] = []
    dead: list[RecoveredMessage] = []
    cursor = conn.execute(
        "SELECT message_id, formula_id, deliveries, dead FROM messages ORDER BY ord"
    )
    for message_id, formula_id, deliveries, is_dead in cursor:
        message = make(message_id, formula_id, fingerprints[formula_id], deliveries, bool(is_dead))
        (dead if is_dead else live).append(message)
    live.extend(dead)
    return live


# -- writing -------------------------------------------------------------------------

_Step = tuple[str, list[tuple[Any, ...]]]


def _plan(changes: Sequence[Change]) -> list[_Step]:
    """The statements for ``changes``: each run of one kind is one step per table.

    Within a run the statements of different tables are independent, so doing
    one table's rows before the next table's keeps the changes' meaning.
    """
    steps: list[_Step] = []
    for kind, run in itertools.groupby(changes, type):
        plan = _PLANS.get(kind)
        if plan is None:
            raise TypeError(f"not a journal change: {kind.__name__}")
        steps.extend(plan(list(run)))
    return steps


def _plan_store(run: list[Any]) -> list[_Step]:
    records: list[FormulaRecord] = [change.record for change in run]
    formulas = [
        (
            r.formula_id,
            r.name,
            r.packed_materials,
            r.fingerprint,
            r.message_id,
            r.created_at,
            r.deliveries,
            r.processed_at,
            r.summary_json,
        )
        for r in records
    ]
    messages = [(r.message_id, r.formula_id) for r in records]
    return [(_INSERT_FORMULA, formulas), (_INSERT_MESSAGE, messages)]


def _plan_remember(run: list[Any]) -> list[_Step]:
    keys: list[Remembered] = [change.remembered for change in run]
    rows = [(k.key, k.body_digest, k.expires_at, k.formula_id, k.duplicate, k.owner) for k in keys]
    return [(_INSERT_KEY, rows)]


def _plan_count(run: list[Any]) -> list[_Step]:
    counts: list[CountDelivery] = run
    return [
        (_COUNT_MESSAGE, [(c.message_deliveries, c.message_id) for c in counts]),
        (_COUNT_FORMULA, [(c.formula_deliveries, c.formula_id) for c in counts]),
    ]


def _plan_result(run: list[Any]) -> list[_Step]:
    results: list[RecordResult] = run
    return [
        (
            _RECORD_RESULT,
            [(r.processed_at, r.summary_json, r.formula_id) for r in results],
        ),
        (_DELETE_MESSAGE, [(r.message_id,) for r in results]),
    ]


def _plan_by_message(sql: str) -> Callable[[list[Any]], list[_Step]]:
    def plan(run: list[Any]) -> list[_Step]:
        return [(sql, [(change.message_id,) for change in run])]

    return plan


def _plan_forget(run: list[Any]) -> list[_Step]:
    forgets: list[ForgetKeys] = run
    return [(_FORGET_KEYS, [(f.before,) for f in forgets])]


def _plan_create_api_key(run: list[Any]) -> list[_Step]:
    records: list[ApiKeyRecord] = [change.record for change in run]
    rows = [
        (
            r.key_id,
            r.name,
            ",".join(r.scopes),
            r.secret_digest,
            r.created_at,
            r.revoked_at,
        )
        for r in records
    ]
    return [(_INSERT_API_KEY, rows)]


def _plan_revoke_api_key(run: list[Any]) -> list[_Step]:
    revokes: list[RevokeApiKey] = run
    return [(_REVOKE_API_KEY, [(r.revoked_at, r.key_id) for r in revokes])]


def _split_scopes(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


_PLANS: dict[type, Callable[[list[Any]], list[_Step]]] = {
    StoreFormula: _plan_store,
    RememberKey: _plan_remember,
    CountDelivery: _plan_count,
    RecordResult: _plan_result,
    DeleteMessage: _plan_by_message(_DELETE_MESSAGE),
    BuryMessage: _plan_by_message(_BURY),
    RedriveMessage: _plan_by_message(_REDRIVE),
    ForgetKeys: _plan_forget,
    CreateApiKey: _plan_create_api_key,
    RevokeApiKey: _plan_revoke_api_key,
}


# -- opening ---------------------------------------------------------------------------


def _prepare_file(path: Path) -> None:
    """Create a missing directory (0700) and file (0600); refuse what cannot be a journal."""
    try:
        if path.is_dir():
            raise JournalError(
                f"the journal {path} is a directory; FORMULARY_DATA must name a file"
            )
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                return  # created meanwhile: opened like any existing file
            os.close(fd)
            os.chmod(path, 0o600)
            log.info("created journal %s", path)
        elif not os.access(path, os.R_OK | os.W_OK):
            raise JournalError(
                f"the journal {path} cannot be read and written by this user "
                "(permission denied); fix its owner or mode"
            )
    except OSError as exc:
        raise JournalError(f"cannot prepare the journal {path}: {exc}") from exc


def _open_error(path: Path, exc: sqlite3.Error) -> JournalError:
    """A JournalError saying what an sqlite3 error at open means, and what to do."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        why = "is not an SQLite database, so not a Formulary journal; nothing was changed"
        todo = "move it aside or point FORMULARY_DATA at another file"
    elif code == sqlite3.SQLITE_CORRUPT:
        why = "is corrupt; nothing was changed"
        todo = "restore it from a backup or move it aside"
    elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        why = "is in use by another process"
        todo = "stop the other broker, or give this one its own FORMULARY_DATA"
    elif code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY):
        why = "cannot be opened for reading and writing"
        todo = "check that it is a file and that it and its directory are writable"
    else:
        why = "cannot be used"
        todo = "check the file and the disk"
    return JournalError(f"the journal {path} {why} ({exc}); {todo}")


def _scalar(conn: sqlite3.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]
