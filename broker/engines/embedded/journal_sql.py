"""The journal file's SQL: its schema, how older files migrate, and what each change writes.

``MIGRATIONS`` bring a file of any older schema version to the current one,
a step per version (``SqliteJournal`` runs them when it opens a file).
:func:`plan` turns a list of changes (``changes``) into statements: each run
of one kind of change is one ``executemany`` per table. The change kinds are
named through their module (``changes.StoreFormula``): the table of plans
names every one of them.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from broker.engines.embedded import changes
from broker.engines.embedded.apikeys import ApiKeyRecord
from broker.engines.embedded.idempotency import Remembered
from broker.engines.embedded.store import FormulaRecord

__all__ = ["MIGRATIONS", "SCHEMA_V1", "TABLES", "TABLES_SINCE", "Step", "plan"]

# -- schema ----------------------------------------------------------------------

SCHEMA_V1 = (
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
    for statement in SCHEMA_V1:
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

TABLES = frozenset({"formulas", "messages", "keys"})
TABLES_SINCE: dict[int, frozenset[str]] = {3: frozenset({"api_keys"})}
"""Tables a file of that version or later must have, beyond ``TABLES``."""

# -- writing ----------------------------------------------------------------------

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


Step = tuple[str, list[tuple[Any, ...]]]


def plan(batch: Sequence[changes.Change]) -> list[Step]:
    """The statements for ``batch``: each run of one kind is one step per table.

    Within a run the statements of different tables are independent, so doing
    one table's rows before the next table's keeps the changes' meaning.
    """
    steps: list[Step] = []
    for kind, run in itertools.groupby(batch, type):
        plan = _PLANS.get(kind)
        if plan is None:
            raise TypeError(f"not a journal change: {kind.__name__}")
        steps.extend(plan(list(run)))
    return steps


def _plan_store(run: list[Any]) -> list[Step]:
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


def _plan_remember(run: list[Any]) -> list[Step]:
    keys: list[Remembered] = [change.remembered for change in run]
    rows = [(k.key, k.body_digest, k.expires_at, k.formula_id, k.duplicate, k.owner) for k in keys]
    return [(_INSERT_KEY, rows)]


def _plan_count(run: list[Any]) -> list[Step]:
    counts: list[changes.CountDelivery] = run
    return [
        (_COUNT_MESSAGE, [(c.message_deliveries, c.message_id) for c in counts]),
        (_COUNT_FORMULA, [(c.formula_deliveries, c.formula_id) for c in counts]),
    ]


def _plan_result(run: list[Any]) -> list[Step]:
    results: list[changes.RecordResult] = run
    return [
        (
            _RECORD_RESULT,
            [(r.processed_at, r.summary_json, r.formula_id) for r in results],
        ),
        (_DELETE_MESSAGE, [(r.message_id,) for r in results]),
    ]


def _plan_by_message(sql: str) -> Callable[[list[Any]], list[Step]]:
    def plan(run: list[Any]) -> list[Step]:
        return [(sql, [(change.message_id,) for change in run])]

    return plan


def _plan_forget(run: list[Any]) -> list[Step]:
    forgets: list[changes.ForgetKeys] = run
    return [(_FORGET_KEYS, [(f.before,) for f in forgets])]


def _plan_create_api_key(run: list[Any]) -> list[Step]:
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


def _plan_revoke_api_key(run: list[Any]) -> list[Step]:
    revokes: list[changes.RevokeApiKey] = run
    return [(_REVOKE_API_KEY, [(r.revoked_at, r.key_id) for r in revokes])]


_PLANS: dict[type, Callable[[list[Any]], list[Step]]] = {
    changes.StoreFormula: _plan_store,
    changes.RememberKey: _plan_remember,
    changes.CountDelivery: _plan_count,
    changes.RecordResult: _plan_result,
    changes.DeleteMessage: _plan_by_message(_DELETE_MESSAGE),
    changes.BuryMessage: _plan_by_message(_BURY),
    changes.RedriveMessage: _plan_by_message(_REDRIVE),
    changes.ForgetKeys: _plan_forget,
    changes.CreateApiKey: _plan_create_api_key,
    changes.RevokeApiKey: _plan_revoke_api_key,
}
