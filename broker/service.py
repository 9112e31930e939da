"""The broker: one object that owns every piece of state and every rule about it.

``Broker`` is a plain Python object; tests call it directly and
``broker.manager`` serves it to other processes. Its public methods are exactly
the manager's ``EXPOSED`` list. Each runs under one lock, so everything a
method does is all-or-nothing with respect to every other caller: a submit
checks the dedupe index, stores the formula and publishes its message, or
changes nothing.

Durability. Every change is also written to the journal (``broker.journal``)
within the same call. A submit changes memory first, then writes the
journal, and undoes the memory changes if the write fails, so a client that
got an error has nothing stored anywhere. Submits that arrive while another
group's commit is under way are admitted together, one after the other, and
share one journal transaction (``broker.group``): each is still all or
nothing, and none is answered before that transaction has committed. An ack
or a result is checked, journalled, then applied (applying cannot fail).
Delivery counts, dead letters and redrives are journalled after the memory
change: a failed write there can only leave a count on disk lower than in
memory, and a restart makes every unacknowledged message visible again
anyway.

``receive`` long-polls on a condition variable tied to that lock: the waiting
thread sleeps until a publish, nack or redrive notifies it, or until the
earliest lease or delay falls due, or until its own deadline.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from broker.changes import (
    BuryMessage,
    Change,
    CountDelivery,
    DeleteMessage,
    ForgetKeys,
    RecordResult,
    Recovered,
    RedriveMessage,
    RememberKey,
    StoreFormula,
)
from broker.errors import (
    DuplicateFormula,
    FormulaNotFound,
    FormularyError,
    IdempotencyKeyReused,
    InvalidSummary,
    MessageNotFound,
    QueueFull,
    StaleReceipt,
    StorageFailed,
)
from broker.formula import FormulaDraft, Material
from broker.group import GroupCommit
from broker.idempotency import IdempotencyKeys, Outcome, Remembered
from broker.interface import (
    ALREADY_ACKED,
    COMPLETED,
    FAILED,
    INVALID_SUMMARY,
    PROCESSED,
    QUEUED,
    STALE,
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    IdempotencyKey,
    MessageInfo,
    Submission,
)
from broker.journal import Journal, MemoryJournal
from broker.queue import DeadLettered, MessageQueue, Redriven
from broker.store import FormulaRecord, FormulaStore, pack_materials, pack_summary

log = logging.getLogger(__name__)

Clock = Callable[[], float]

EXPOSED = (
    "ping",
    "submit",
    "submit_many",
    "get_formula",
    "get_formulas",
    "list_formulas",
    "stats",
    "receive",
    "complete",
    "complete_many",
    "ack",
    "nack",
    "extend",
    "dead_letters",
    "redrive",
    "redrive_all",
    "message_info",
)

MAX_PAGE = 500
MAX_BATCH = 100
MAX_WAIT_SECONDS = 60.0


# What a submit hands the group commit: the draft and its Idempotency-Key, if any.
SubmitRequest = tuple[FormulaDraft, IdempotencyKey | None]


class _Step:
    """One group's journal changes, how to undo their memory side, and its counts."""

    __slots__ = ("changes", "duplicates", "refused_capacity", "submitted", "undoing")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.undoing: list[Callable[[], None]] = []
        self.submitted = 0
        self.duplicates = 0
        self.refused_capacity = 0

    def undo(self) -> None:
        # Newest first: the store, the queue and the keys each undo only
        # their latest addition.
        while self.undoing:
            self.undoing.pop()()


def new_id() -> str:
    """Opaque, unguessable, URL-safe: 128 random bits in 22 characters."""
    return secrets.token_urlsafe(16)


def rfc3339(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Broker:
    def __init__(
        self,
        *,
        queue_capacity: int = 100_000,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 5,
        idempotency_ttl: float = 24 * 3600.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        new_id: Callable[[], str] = new_id,
        queue: MessageQueue | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._clock = clock
        self._wall_clock = wall_clock
        self._new_id = new_id
        self._store = FormulaStore()
        self._keys = IdempotencyKeys(idempotency_ttl)
        self._queue = queue or MessageQueue(
            capacity=queue_capacity,
            visibility_timeout=visibility_timeout,
            max_deliveries=max_deliveries,
            clock=clock,
        )
        self._journal: Journal = journal or MemoryJournal()
        self._keys_expired = False
        self._submitted = 0
        self._duplicates = 0
        self._refused_capacity = 0
        self._processed = 0
        self._submits = GroupCommit(self._submit_group)
        self._recover()

    def _recover(self) -> None:
        """Rebuild store, index, keys and queue from the journal."""
        # Millions of new objects, none of them garbage: collecting while
        # building them only costs time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._rebuild(self._journal.load())
        finally:
            if collecting:
                gc.enable()

    def _rebuild(self, recovered: Recovered) -> None:
        for record in recovered.formulas:
            self._store.add(record)
        buried: list[Change] = []
        for message in recovered.messages:
            # A message that used its last delivery before the crash is dead:
            # its lease would have run out into the dead letters.
            dead = message.dead or message.deliveries >= self._queue.max_deliveries
            if dead and not message.dead:
                buried.append(BuryMessage(message.message_id))
            self._queue.restore(
                message.message_id,
                message.formula_id,
                message.fingerprint,
                message.deliveries,
                dead,
            )
        for remembered in recovered.keys:
            self._keys.restore(remembered)
        self._keys_expired = self._keys.expire(self._wall_clock()) > 0
        if buried:
            self._journal.write(buried)
        if recovered.formulas or recovered.messages:
            log.info(
                "recovered %d formulas, %d unacknowledged messages, %d idempotency keys",
                len(recovered.formulas),
                len(recovered.messages),
                len(recovered.keys),
            )

    def close(self) -> None:
        """Close the journal (not exposed: the broker process calls it on exit)."""
        with self._lock:
            self._journal.close()

    # -- submissions ----------------------------------------------------------

    def ping(self) -> bool:
        return True

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        # Concurrent submits share one journal commit (broker.group); each
        # still gets its own all-or-nothing outcome, answered after that commit.
        return self._submits((draft, idempotency))

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[Submission | FormularyError]:
        """``submit`` for several clients' submits at once: one outcome per request, in order.

        Each is its own atomic submit, exactly as if sent alone; an outcome is
        the ``Submission`` or the error ``submit`` would have raised
        (``DuplicateFormula``, ``QueueFull``, ``IdempotencyKeyReused``,
        ``StorageFailed``). One round trip for many: the API sends the submits
        its threads have ready together (see ``broker.client``).
        """
        outcomes: list[Submission | FormularyError] = []
        for outcome in self._submits.outcomes([(draft, key) for draft, key in requests]):
            if isinstance(outcome, BaseException) and not isinstance(outcome, FormularyError):
                raise outcome
            outcomes.append(outcome)
        return outcomes

    def _submit_group(self, requests: Sequence[SubmitRequest]) -> list[Submission | BaseException]:
        """Admit ``requests`` in order and journal them in one write: all, or each alone.

        Each request sees the ones before it (a make-up twice in one group is
        a 409 for the second). If the write fails, every memory change of the
        group is undone and, for a group of more than one, each request is run
        again alone, so each gets the answer it would have had by itself.
        """
        with self._lock:
            now = self._wall_clock()
            if self._keys.expire(now):
                self._keys_expired = True
            outcomes = self._admit_and_write(requests, now)
            if not isinstance(outcomes, StorageFailed):
                return outcomes
            if len(requests) == 1:
                return [outcomes]
            alone = [self._admit_and_write([request], now) for request in requests]
            return [each if isinstance(each, StorageFailed) else each[0] for each in alone]

    def _admit_and_write(
        self, requests: Sequence[SubmitRequest], now: float
    ) -> list[Submission | BaseException] | StorageFailed:
        """Admit ``requests`` and journal them in one write, or keep nothing of them."""
        step = _Step()
        try:
            outcomes = [self._admit(draft, key, now, step) for draft, key in requests]
        except BaseException:
            step.undo()
            raise
        try:
            self._write(step.changes, now)
        except StorageFailed as failed:
            step.undo()
            return failed
        self._settle_submits(step)
        return outcomes

    def _settle_submits(self, step: _Step) -> None:
        self._submitted += step.submitted
        self._duplicates += step.duplicates
        self._refused_capacity += step.refused_capacity
        if step.submitted:
            self._lock.notify(step.submitted)

    def _admit(
        self, draft: FormulaDraft, idempotency: IdempotencyKey | None, now: float, step: _Step
    ) -> Submission | BaseException:
        """One submit in memory: its outcome; its changes and their undoing go to ``step``."""
        if idempotency is not None:
            earlier = self._keys.get(idempotency.key, now)
            if earlier is not None:
                return self._replay(earlier, idempotency)
        existing = self._store.by_fingerprint(draft.fingerprint)
        if existing is not None:
            duplicate = DuplicateFormula(existing.formula_id, existing.fingerprint)
            if idempotency is not None:
                self._remember(idempotency, duplicate, now, step)
            step.duplicates += 1
            return duplicate
        if not self._queue.has_room():
            step.refused_capacity += 1
            return QueueFull(self._queue.capacity)
        record = FormulaRecord(
            formula_id=self._new_id(),
            name=draft.name,
            packed_materials=pack_materials(draft.materials),
            fingerprint=draft.fingerprint,
            message_id=self._new_id(),
            created_at=now,
        )
        submission = Submission(self._view(record, draft.materials))
        self._store.add(record)
        step.changes.append(StoreFormula(record))
        step.undoing.append(lambda: self._store.discard_last(record))
        if idempotency is not None:
            self._remember(idempotency, submission, now, step)
        self._queue.publish(record.message_id, record.formula_id, record.fingerprint)
        step.undoing.append(lambda: self._queue.unpublish(record.message_id))
        step.submitted += 1
        return submission

    def _remember(
        self, idempotency: IdempotencyKey, outcome: Outcome, now: float, step: _Step
    ) -> None:
        remembered = self._keys.put(idempotency.key, idempotency.body_digest, outcome, now)
        step.changes.append(RememberKey(remembered))
        step.undoing.append(lambda: self._keys.discard(remembered))

    def _write(self, changes: list[Change], now: float | None = None) -> None:
        """Journal ``changes`` in one transaction; a failure becomes ``StorageFailed``."""
        if now is not None and self._keys_expired:
            changes = [*changes, ForgetKeys(now)]
        try:
            self._journal.write(changes)
        except Exception as exc:
            log.error("journal write failed: %r", exc)
            raise StorageFailed(f"{type(exc).__name__}: {exc}") from None
        if now is not None:
            self._keys_expired = False

    def _replay(
        self, earlier: Remembered, idempotency: IdempotencyKey
    ) -> Submission | BaseException:
        if earlier.body_digest != idempotency.body_digest:
            return IdempotencyKeyReused(idempotency.key)
        outcome = earlier.outcome
        if isinstance(outcome, DuplicateFormula):
            return DuplicateFormula(outcome.existing_id, outcome.fingerprint, True)
        return Submission(outcome.formula, replayed=True)

    def get_formula(self, formula_id: str) -> FormulaView:
        with self._lock:
            record = self._store.get(formula_id)
            if record is None:
                raise FormulaNotFound(formula_id)
            return self._view(record)

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        with self._lock:
            records = [self._store.get(formula_id) for formula_id in formula_ids]
            return [None if r is None else self._view(r) for r in records]

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        with self._lock:
            page = self._store.page(limit, cursor)
            return FormulaPage(tuple(self._view(r) for r in page.records), page.next_cursor)

    def stats(self) -> BrokerStats:
        with self._lock:
            q = self._queue.stats()
            return BrokerStats(
                formulas=len(self._store),
                depth=q.depth,
                in_flight=q.in_flight,
                delayed=q.delayed,
                dead=q.dead,
                submitted=self._submitted,
                duplicates=self._duplicates,
                refused_capacity=self._refused_capacity,
                published=q.published,
                delivered=q.delivered,
                redelivered=q.redelivered,
                acked=q.acked,
                nacked=q.nacked,
                dead_lettered=q.dead_lettered,
                redriven=q.redriven,
                processed=self._processed,
            )

    # -- consumers --------------------------------------------------------------

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        max_messages = max(1, min(int(max_messages), MAX_BATCH))
        wait_seconds = max(0.0, min(float(wait_seconds), MAX_WAIT_SECONDS))
        deadline = self._clock() + wait_seconds
        with self._lock:
            while True:
                deliveries = self._queue.receive(consumer, max_messages, visibility_timeout)
                counts: list[Change] = []
                for delivery in deliveries:
                    record = self._store.get(delivery.formula_id)
                    if record is not None:
                        record.deliveries += 1
                        counts.append(
                            CountDelivery(
                                delivery.message_id,
                                delivery.formula_id,
                                delivery.delivery,
                                record.deliveries,
                            )
                        )
                self._settle_events(counts)
                now = self._clock()
                if deliveries or now >= deadline:
                    if deliveries:
                        # New leases may fall due before other waiters' timeouts.
                        self._lock.notify_all()
                    return deliveries
                due = self._queue.next_due()
                timeout = deadline - now if due is None else min(deadline, due) - now
                self._lock.wait(max(timeout, 0.0))

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        [outcome] = self.complete_many([(receipt, summary)])
        if outcome == STALE:
            raise StaleReceipt(receipt)
        if outcome == INVALID_SUMMARY:
            raise InvalidSummary("JSON cannot hold this summary")
        return outcome == COMPLETED

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Check every lease, journal every result and ack in one write, then apply."""
        with self._lock:
            outcomes: list[str] = []
            changes: list[Change] = []
            applies: list[tuple[str, FormulaRecord | None, str]] = []
            now = self._wall_clock()
            seen: set[str] = set()
            for receipt, summary in results:
                outcome, lease = self._check_lease(receipt, seen)
                if lease is not None:
                    try:
                        summary_json = pack_summary(summary)
                    except (TypeError, ValueError):
                        outcome = INVALID_SUMMARY
                    else:
                        record = self._store.get(lease.formula_id)
                        if record is not None and record.processed_at is None:
                            changes.append(
                                RecordResult(record.formula_id, lease.message_id, now, summary_json)
                            )
                            record_to_mark = record
                        else:
                            changes.append(DeleteMessage(lease.message_id))
                            record_to_mark = None
                        applies.append((receipt, record_to_mark, summary_json))
                        seen.add(lease.message_id)
                outcomes.append(outcome)
            if changes:
                self._write(changes)
            for receipt, record, summary_json in applies:
                self._queue.ack(receipt)
                if record is not None:
                    record.processed_at = now
                    record.summary_json = summary_json
                    self._processed += 1
            self._settle_events()
            return outcomes

    def _check_lease(self, receipt: str, seen: set[str]) -> tuple[str, MessageInfo | None]:
        try:
            lease = self._queue.lease(receipt)
        except StaleReceipt:
            return STALE, None
        if lease is None or lease.message_id in seen:
            return ALREADY_ACKED, None
        return COMPLETED, lease

    def ack(self, receipt: str) -> bool:
        with self._lock:
            lease = self._queue.lease(receipt)
            if lease is None:
                return False
            self._write([DeleteMessage(lease.message_id)])
            acked = self._queue.ack(receipt)
            self._settle_events()
            return acked

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        with self._lock:
            self._queue.nack(receipt, max(0.0, float(delay)))
            self._settle_events()
            self._lock.notify_all()

    def extend(self, receipt: str, seconds: float) -> float:
        with self._lock:
            deadline = self._queue.extend(receipt, float(seconds))
            self._settle_events()
            return deadline

    # -- operators ---------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        with self._lock:
            dead = self._queue.dead_letters(limit)
            self._settle_events()
            return dead

    def redrive(self, message_id: str) -> None:
        with self._lock:
            self._queue.redrive(message_id)
            self._settle_events()
            self._lock.notify()

    def redrive_all(self) -> int:
        with self._lock:
            count = self._queue.redrive_all()
            self._settle_events()
            self._lock.notify(count)
            return count

    def message_info(self, message_id: str) -> MessageInfo:
        """The message's state; its ``visible_at`` in wall-clock epoch seconds.

        The queue keeps deadlines on the monotonic clock, which means nothing
        outside this process; operators get the moment it stands for.
        """
        with self._lock:
            info = self._queue.info(message_id)
            self._settle_events()
            if info is None:
                raise MessageNotFound(message_id)
            if info.visible_at is None:
                return info
            wall = self._wall_clock() + (info.visible_at - self._clock())
            return replace(info, visible_at=wall)

    # -- internals ---------------------------------------------------------------

    def _settle_events(self, changes: list[Change] | None = None) -> None:
        """Journal what the queue did on its own: dead letters and redrives."""
        changes = list(changes or ())
        for event in self._queue.drain_events():
            if isinstance(event, DeadLettered):
                log.warning(
                    "dead-lettered message %s of formula %s after %d deliveries",
                    event.message_id,
                    event.formula_id,
                    event.deliveries,
                )
                changes.append(BuryMessage(event.message_id))
            elif isinstance(event, Redriven):
                changes.append(RedriveMessage(event.message_id))
        if changes:
            self._write(changes)

    def _status(self, record: FormulaRecord) -> str:
        if record.processed_at is not None:
            return PROCESSED
        info = self._queue.info(record.message_id)
        if info is not None and info.state == "dead":
            return FAILED
        return QUEUED

    def _view(
        self, record: FormulaRecord, materials: tuple[Material, ...] | None = None
    ) -> FormulaView:
        """The client's view; ``materials`` saves unpacking what the caller has at hand."""
        return FormulaView(
            id=record.formula_id,
            name=record.name,
            materials=record.materials if materials is None else materials,
            fingerprint=record.fingerprint,
            message_id=record.message_id,
            created_at=rfc3339(record.created_at),
            status=self._status(record),
            deliveries=record.deliveries,
            processed_at=None if record.processed_at is None else rfc3339(record.processed_at),
            summary=record.summary,
        )
