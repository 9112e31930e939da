"""The submit path: a group of submits admitted into memory as one step that can be taken back.

A submit, top to bottom (``EmbeddedBroker.submit_many`` runs a group of them
under its lock, then journals the group's changes in one transaction):

1. an ``Idempotency-Key`` its owner used before answers with its first answer, rebuilt
   from the formula it names (``IdempotencyKeyReused`` if the body differs);
2. a known make-up is a ``DuplicateFormula``, which the key, if any, remembers;
3. a full queue is ``QueueFull``;
4. otherwise the formula is stored, the key remembered and the message
   published: a ``Submission``.

Outcomes are values, never raised here. Each memory change is recorded with
its journal change and its undo, so that when the journal write fails the
facade takes the whole group back and memory is exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from broker.engines.embedded.changes import Change, RememberKey, StoreFormula
from broker.engines.embedded.idempotency import IdempotencyKeys, Remembered
from broker.engines.embedded.queue import MessageQueue
from broker.engines.embedded.store import FormulaRecord, FormulaStore, pack_materials, view
from broker.errors import DuplicateFormula, IdempotencyKeyReused, QueueFull
from broker.formula import FormulaDraft
from broker.interface import QUEUED, IdempotencyKey, Submission, SubmitOutcome


class Admission:
    """One group's submits in memory: their journal changes, their undoing, their counts."""

    def __init__(
        self,
        store: FormulaStore,
        keys: IdempotencyKeys,
        queue: MessageQueue,
        new_id: Callable[[], str],
        now: float,
    ) -> None:
        self._store = store
        self._keys = keys
        self._queue = queue
        self._new_id = new_id
        self._now = now
        # Each undo is a bound method and its argument, never a closure over
        # self: a closure would make every group a reference cycle, freed
        # only by the garbage collector (8-12 objects per submit, the record
        # and its journal change among them).
        self._undoing: list[Callable[[], None]] = []
        self.changes: list[Change] = []
        self.submitted = 0
        self.duplicates = 0
        self.refused_capacity = 0

    def admit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None) -> SubmitOutcome:
        """One submit, seeing every submit admitted before it (in this group too)."""
        if idempotency is not None:
            earlier = self._keys.get(idempotency.owner, idempotency.key, self._now)
            if earlier is not None:
                return self._replay(earlier, idempotency)
        existing = self._store.by_fingerprint(draft.fingerprint)
        if existing is not None:
            self._remember(idempotency, existing, duplicate=True)
            self.duplicates += 1
            return DuplicateFormula(existing.formula_id, existing.fingerprint)
        if not self._queue.has_room():
            self.refused_capacity += 1
            return QueueFull(self._queue.capacity)
        record = FormulaRecord.new(
            formula_id=self._new_id(),
            name=draft.name,
            packed_materials=pack_materials(draft.materials),
            fingerprint=draft.fingerprint,
            message_id=self._new_id(),
            created_at=self._now,
        )
        self._store.add(record)
        self.changes.append(StoreFormula(record))
        self._undoing.append(partial(self._store.discard_last, record))
        self._remember(idempotency, record, duplicate=False)
        self._queue.publish(record.message_id, record.formula_id, record.fingerprint)
        self._undoing.append(partial(self._queue.unpublish, record.message_id))
        self.submitted += 1
        return Submission(view(record, QUEUED, draft.materials, as_submitted=True))

    def undo(self) -> None:
        """Take back every memory change, newest first (each structure undoes its latest)."""
        while self._undoing:
            self._undoing.pop()()

    def _remember(
        self, idempotency: IdempotencyKey | None, record: FormulaRecord, *, duplicate: bool
    ) -> None:
        if idempotency is None:
            return
        remembered = self._keys.put(
            idempotency.owner,
            idempotency.key,
            idempotency.body_digest,
            record.formula_id,
            duplicate,
            self._now,
        )
        self.changes.append(RememberKey(remembered))
        self._undoing.append(partial(self._keys.discard, remembered))

    def _replay(self, earlier: Remembered, idempotency: IdempotencyKey) -> SubmitOutcome:
        if earlier.body_digest != idempotency.body_digest:
            return IdempotencyKeyReused(idempotency.key)
        record = self._store.get(earlier.formula_id)
        if record is None:  # formulas are never deleted; a journal that says otherwise is wrong
            raise LookupError(f"idempotency key names formula {earlier.formula_id}, not stored")
        if earlier.duplicate:
            return DuplicateFormula(record.formula_id, record.fingerprint, True)
        return Submission(view(record, QUEUED, as_submitted=True), replayed=True)
