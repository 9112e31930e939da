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

Schema (version 3, ``PRAGMA user_version``; ``journal_sql`` holds it, the
``MIGRATIONS`` that bring older files forward, and the statements each
change becomes): ``formulas`` in submit order (``seq``), with materials as the
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
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from broker.engines import EngineError
from broker.engines.embedded.apikeys import ApiKeyRecord
from broker.engines.embedded.changes import Change, Recovered, RecoveredMessage
from broker.engines.embedded.idempotency import Remembered
from broker.engines.embedded.journal_sql import MIGRATIONS, TABLES, TABLES_SINCE, Step, plan
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
_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


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


# -- the SQLite journal ---------------------------------------------------------------


CHECKPOINT_PAGES: Final = 200
"""WAL pages (4 KiB each) after which a commit also copies the WAL into the file.

That checkpoint runs inside the commit, so under the broker's lock: every
submit waits for it. SQLite's default is 1,000 pages. With a million formulas
stored, their rows and index pages are spread over a 340 MB file, and a
checkpoint of 1,000 pages took 15-25 ms (10,000 pages: 60-70 ms). Checkpoints
of 200 pages take 5-8 ms, and less time in all (about 120 against 250 ms
over 2,000 commits). Submit p99 at 1,000,000 stored formulas went from about 20 to
12 ms (bench/README.md)."""


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
            conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES:d}")
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
        expected = TABLES.union(
            *(names for since, names in TABLES_SINCE.items() if version >= since)
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
            steps = plan(changes)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"cannot journal these changes: {exc}") from exc
        self._transaction(conn, [steps])

    def write_batches(self, batches: Iterable[Sequence[Change]]) -> None:
        """Apply every batch of changes in order, all in one transaction.

        For a bulk import (``broker.migrate``): ``batches`` may be a generator,
        so the caller sees progress between batches and never holds them all.
        All or nothing as ``write``; an exception raised while producing a
        batch rolls everything back and propagates as it is.
        """
        conn = self._connection()
        self._transaction(conn, (plan(batch) for batch in batches))

    def _transaction(self, conn: sqlite3.Connection, plans: Iterable[list[Step]]) -> None:
        """Every step of ``plans`` in one transaction: all of them, or none and raise."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            for steps in plans:
                for sql, rows in steps:
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
            FormulaRecord.new(*row)
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


def _split_scopes(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


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
