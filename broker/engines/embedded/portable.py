"""The embedded engine's side of a copy (``broker.migrate``): a journal file, read or filled.

Read through ``SqliteJournal.load`` (what a starting broker recovers: the
file is opened exclusively, so a running broker makes the open fail), and
filled through the journal's own change records in one SQLite transaction
(``SqliteJournal.write_batches``), so the file holds exactly what a broker
would have journalled.

Filling, in the order the change records allow:

1. every formula (``StoreFormula``, which also writes its message, fresh),
   and ``DeleteMessage`` for the processed ones (their message was acked
   when the result was recorded);
2. every idempotency key (``RememberKey``), with its owner;
3. every message, in the source's order, moved to the back of the queue
   (``RedriveMessage`` for a live one, ``BuryMessage`` for a dead letter),
   then given its delivery count (``CountDelivery``); a recovering broker
   reads messages in that order, so the queue order is the source's;
4. ``DeleteMessage`` for the unprocessed formulas that had no message left
   (acked without a result);
5. every API key (``CreateApiKey``, revoked already if it was).

Between steps 1 and 4 the unprocessed formulas' message ids are kept in
memory (nothing is kept for a processed formula).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from broker.engines import EngineError, portable
from broker.engines.embedded.apikeys import ApiKeyRecord
from broker.engines.embedded.changes import (
    BuryMessage,
    Change,
    CountDelivery,
    CreateApiKey,
    DeleteMessage,
    Recovered,
    RedriveMessage,
    RememberKey,
    StoreFormula,
)
from broker.engines.embedded.idempotency import Remembered
from broker.engines.embedded.journal import SqliteJournal
from broker.engines.embedded.store import FormulaRecord

__all__ = ["EmbeddedPortable", "open_source", "open_target"]

T = TypeVar("T")


def open_source(data: str) -> EmbeddedPortable:
    """The journal at ``data``, to copy from: it must exist (a copy never creates its source)."""
    path = Path(data)
    if not path.is_file():
        raise EngineError(f"the source journal {path} does not exist (or is not a file)")
    return EmbeddedPortable(SqliteJournal(path))


def open_target(data: str) -> EmbeddedPortable:
    """The journal at ``data``, to copy into; created if missing."""
    return EmbeddedPortable(SqliteJournal(data))


class EmbeddedPortable:
    """One journal file, held exclusively until ``close``."""

    def __init__(self, journal: SqliteJournal, *, wall_clock: Callable[[], float] = time.time):
        self._journal = journal
        self._wall_clock = wall_clock
        self._recovered: Recovered | None = None
        self._now = wall_clock()
        self.where = str(journal.path)

    def close(self) -> None:
        self._journal.close()

    def _state(self) -> Recovered:
        if self._recovered is None:
            self._recovered = self._journal.load()
            self._now = self._wall_clock()
        return self._recovered

    # -- reading ---------------------------------------------------------------------

    def holdings(self) -> portable.Holdings:
        state = self._state()
        alive = len(self._alive_keys())
        return portable.Holdings(
            formulas=len(state.formulas),
            keys=alive,
            expired_keys=len(state.keys) - alive,
            messages=len(state.messages),
            dead=sum(message.dead for message in state.messages),
            api_keys=len(state.api_keys),
        )

    def formulas(self, batch: int) -> Iterator[list[portable.FormulaState]]:
        for chunk in _chunks(self._state().formulas, batch):
            yield [
                portable.FormulaState(
                    formula_id=r.formula_id,
                    name=r.name,
                    materials=_unpack(r.packed_materials),
                    fingerprint=r.fingerprint,
                    message_id=r.message_id,
                    created_at=r.created_at,
                    deliveries=r.deliveries,
                    processed_at=r.processed_at,
                    summary_json=r.summary_json,
                )
                for r in chunk
            ]

    def keys(self, batch: int) -> Iterator[list[portable.KeyState]]:
        for chunk in _chunks(self._alive_keys(), batch):
            yield [
                portable.KeyState(
                    k.key, k.body_digest, k.formula_id, k.duplicate, k.expires_at, k.owner
                )
                for k in chunk
            ]

    def messages(self, batch: int) -> Iterator[list[portable.MessageState]]:
        for chunk in _chunks(self._state().messages, batch):
            yield [
                portable.MessageState(
                    m.message_id, m.formula_id, m.fingerprint, m.deliveries, m.dead
                )
                for m in chunk
            ]

    def api_keys(self, batch: int) -> Iterator[list[portable.ApiKeyState]]:
        for chunk in _chunks(self._state().api_keys, batch):
            yield [
                portable.ApiKeyState(
                    k.key_id, k.name, k.scopes, k.secret_digest, k.created_at, k.revoked_at
                )
                for k in chunk
            ]

    def _alive_keys(self) -> list[Remembered]:
        """Keys not yet expired, oldest first; a key recorded again after it expired, once."""
        alive = {(k.owner, k.key): k for k in self._state().keys if k.expires_at > self._now}
        return list(alive.values())

    # -- filling -------------------------------------------------------------------------

    def import_all(self, records: portable.Records) -> None:
        # The file has been held exclusively since it was opened: nobody
        # can write between this check and the transaction.
        self.holdings().require_empty(self.where)
        self._recovered = None
        self._journal.write_batches(_changes(records))


def _changes(records: portable.Records) -> Iterator[list[Change]]:
    """The journal changes that make the copy, one batch of records at a time."""
    # Formulas not processed yet, by message id: their message may still be
    # live. The formula's lifetime count is for CountDelivery, which sets both.
    unprocessed: dict[str, tuple[str, int]] = {}
    for batch in records.formulas:
        stored: list[Change] = []
        acked: list[Change] = []
        for f in batch:
            record = FormulaRecord.new(
                f.formula_id,
                f.name,
                _pack(f.materials),
                f.fingerprint,
                f.message_id,
                f.created_at,
                f.deliveries,
                f.processed_at,
                f.summary_json,
            )
            stored.append(StoreFormula(record))
            if f.processed_at is None:
                unprocessed[f.message_id] = (f.formula_id, f.deliveries)
            else:  # a result is recorded in the same step as the ack
                acked.append(DeleteMessage(f.message_id))
        yield stored + acked
    for key_batch in records.keys:
        yield [
            RememberKey(
                Remembered(k.key, k.body_digest, k.formula_id, k.duplicate, k.expires_at, k.owner)
            )
            for k in key_batch
        ]
    for message_batch in records.messages:
        # Moves first, in order (each goes to the back of the queue); then the counts.
        moved: list[Change] = []
        counted: list[Change] = []
        for m in message_batch:
            formula_id, formula_deliveries = unprocessed.pop(m.message_id, ("", 0))
            if formula_id != m.formula_id:
                raise EngineError(
                    f"message {m.message_id} names formula {m.formula_id}, which the source "
                    "does not hold unprocessed with that message: the source is inconsistent"
                )
            moved.append(BuryMessage(m.message_id) if m.dead else RedriveMessage(m.message_id))
            if m.deliveries:
                counted.append(
                    CountDelivery(m.message_id, m.formula_id, m.deliveries, formula_deliveries)
                )
        yield moved + counted
    # Formulas whose message was acked without a result.
    for chunk in _chunks(list(unprocessed), 5_000):
        yield [DeleteMessage(message_id) for message_id in chunk]
    for api_key_batch in records.api_keys:
        yield [
            CreateApiKey(
                ApiKeyRecord(
                    k.key_id,
                    k.name,
                    tuple(k.scopes),
                    k.secret_digest,
                    k.created_at,
                    k.revoked_at,
                )
            )
            for k in api_key_batch
        ]


def _unpack(packed: str) -> tuple[tuple[str, str], ...]:
    """``store.pack_materials``'s text as (name, decimal text) pairs, no Decimal made."""
    parts = packed.split("\t")
    return tuple(zip(parts[0::2], parts[1::2], strict=True))


def _pack(materials: Sequence[tuple[str, str]]) -> str:
    """(name, decimal text) pairs as ``store.pack_materials`` writes them."""
    return "\t".join([part for pair in materials for part in pair])


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
