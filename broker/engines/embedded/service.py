"""The embedded engine's face: one object, one lock, every rule about the state.

``EmbeddedBroker`` implements ``broker.interface.Broker``; tests call it
directly and the broker process serves it (``broker.transport``). Each public
method runs under one lock, so whatever it does is all-or-nothing with
respect to every other caller.

Durability: every change is written to the journal within the same call.

- Submits (``submit_many``; the path itself is in ``admission``) change
  memory, journal the whole call's changes in one transaction and take the
  memory changes back if that write fails, so a client that got an error
  has nothing stored anywhere. The client sends the submits a process has
  ready in one ``submit_many`` (``broker.client``), so one commit serves them
  all; each is answered only after it.
- A result or an ack is checked, journalled, then applied (applying cannot fail).
- Delivery counts, dead letters and redrives are journalled after the memory
  change: a failed write there can only leave a count on disk lower than in
  memory, and a restart makes every unacknowledged message visible again
  anyway.
- An API key made or revoked is journalled, then applied, as a result is.

Two calls keep off the lock: ``rate_limit``, whose token buckets
(``shared.TokenBuckets``) have a lock of their own, and the argument checks
of ``create_key``. The calls both engines answer alike (``submit``,
``complete``, ``get_formula``, the bounds of ``receive`` and
``list_formulas``) are ``shared.EngineCalls``'; ``recovery`` fills the
state from the journal at start.

``receive`` long-polls on a condition variable tied to the lock: the waiting
thread sleeps until a publish, nack or redrive notifies it, or until the
earliest lease or delay falls due, or until its own deadline.

Times: the queue runs on the monotonic clock (leases must not jump with the
wall clock); what leaves this object is in wall-clock epoch seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from broker.apikeys import digest, new_key_id, new_secret, parse_name, parse_scopes
from broker.engines.embedded.admission import Admission
from broker.engines.embedded.apikeys import ApiKeyRecord, ApiKeys
from broker.engines.embedded.changes import (
    BuryMessage,
    Change,
    CountDelivery,
    CreateApiKey,
    DeleteMessage,
    ForgetKeys,
    RecordResult,
    RedriveMessage,
    RevokeApiKey,
)
from broker.engines.embedded.idempotency import IdempotencyKeys
from broker.engines.embedded.journal import Journal, MemoryJournal
from broker.engines.embedded.queue import DeadLettered, MessageQueue, Redriven
from broker.engines.embedded.recovery import recover
from broker.engines.embedded.store import FormulaRecord, FormulaStore, view
from broker.engines.shared import EngineCalls, TokenBuckets, new_id, pack_summary
from broker.errors import (
    ApiKeyNotFound,
    MessageNotFound,
    StaleReceipt,
    StorageFailed,
)

# Both engines implement broker.interface.Broker, so the PostgreSQL engine imports
# much the same list of its types.
from broker.interface import (
    ALREADY_ACKED,
    COMPLETED,
    DEAD,
    FAILED,
    INVALID_SUMMARY,
    PROCESSED,
    QUEUED,
    STALE,
    ApiKey,
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    MessageInfo,
    NewApiKey,
    SubmitOutcome,
    SubmitRequest,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class EmbeddedBroker(EngineCalls):
    def __init__(
        self,
        *,
        queue_capacity: int = 100_000,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 5,
        idempotency_ttl: float = 24 * 3600.0,
        rate_limit: float | None = None,
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
        self._api_keys = ApiKeys()
        self._buckets = None if rate_limit is None else TokenBuckets(rate_limit, clock)
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
        recover(self._journal, self._store, self._queue, self._keys, self._api_keys)
        self._keys_expired = self._keys.expire(self._wall_clock()) > 0

    def close(self) -> None:
        """Close the journal (not a broker method: the broker process calls it on exit)."""
        with self._lock:
            self._journal.close()

    # -- submissions --------------------------------------------------------------------

    def ping(self) -> bool:
        return True

    def authenticate(self, key_id: str, secret_digest: str) -> ApiKey | None:
        with self._lock:
            record = self._api_keys.check(key_id, secret_digest)
            return None if record is None else record.view()

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        """Admit ``requests`` in order and journal them in one write: all, or each alone.

        If the shared write fails, every memory change of the call is taken
        back and, for more than one request, each is run again alone, so each
        gets the answer it would have had by itself.
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
    ) -> list[SubmitOutcome] | StorageFailed:
        admission = Admission(self._store, self._keys, self._queue, self._new_id, now)
        try:
            outcomes = [admission.admit(draft, key) for draft, key in requests]
            self._write(admission.changes, now)
        except StorageFailed as failed:
            admission.undo()
            return failed
        except BaseException:
            admission.undo()
            raise
        self._submitted += admission.submitted
        self._duplicates += admission.duplicates
        self._refused_capacity += admission.refused_capacity
        if admission.submitted:
            self._lock.notify(admission.submitted)
        return outcomes

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        with self._lock:
            records = [self._store.get(formula_id) for formula_id in formula_ids]
            return [None if r is None else self._view(r) for r in records]

    def _page(self, limit: int, cursor: str | None) -> FormulaPage:
        with self._lock:
            page = self._store.page(limit, cursor)
            return FormulaPage(tuple(self._view(r) for r in page.records), page.next_cursor)

    def stats(self) -> BrokerStats:
        with self._lock:
            queue = self._queue.stats()
            return BrokerStats(
                formulas=len(self._store),
                submitted=self._submitted,
                duplicates=self._duplicates,
                refused_capacity=self._refused_capacity,
                processed=self._processed,
                # The queue's figures are the rest of BrokerStats, by the same names.
                **{f.name: getattr(queue, f.name) for f in fields(queue)},
            )

    # -- consumers ---------------------------------------------------------------------

    def _receive(
        self, consumer: str, max_messages: int, visibility_timeout: float | None, wait: float
    ) -> list[Delivery]:
        deadline = self._clock() + wait
        with self._lock:
            while True:
                deliveries = self._queue.receive(consumer, max_messages, visibility_timeout)
                counts: list[Change] = []
                for delivery in deliveries:
                    record = self._store.count_delivery(delivery.formula_id)
                    if record is not None:
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
                    return [
                        replace(d, lease_expires_at=self._to_wall(d.lease_expires_at))
                        for d in deliveries
                    ]
                due = self._queue.next_due()
                timeout = deadline - now if due is None else min(deadline, due) - now
                self._lock.wait(max(timeout, 0.0))

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Check every lease, journal every result and ack in one write, then apply."""
        with self._lock:
            outcomes: list[str] = []
            changes: list[Change] = []
            applies: list[tuple[str, str | None, str]] = []  # receipt, formula id to mark
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
                            to_mark: str | None = record.formula_id
                        else:
                            changes.append(DeleteMessage(lease.message_id))
                            to_mark = None
                        applies.append((receipt, to_mark, summary_json))
                        seen.add(lease.message_id)
                outcomes.append(outcome)
            if changes:
                self._write(changes)
            for receipt, formula_id, summary_json in applies:
                self._queue.ack(receipt)
                if formula_id is not None:
                    self._store.record_result(formula_id, now, summary_json)
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
            return self._to_wall(deadline)

    # -- operators ---------------------------------------------------------------------

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
        with self._lock:
            info = self._queue.info(message_id)
            self._settle_events()
            if info is None:
                raise MessageNotFound(message_id)
            if info.visible_at is None:
                return info
            return replace(info, visible_at=self._to_wall(info.visible_at))

    def create_key(self, name: str, scopes: Sequence[str]) -> NewApiKey:
        name, chosen = parse_name(name), parse_scopes(scopes)
        with self._lock:
            key_id = new_key_id()
            while self._api_keys.get(key_id) is not None:
                key_id = new_key_id()
            secret = new_secret(key_id)
            record = ApiKeyRecord(key_id, name, chosen, digest(secret), self._wall_clock())
            self._write([CreateApiKey(record)])
            self._api_keys.put(record)
        log.info("made API key %s (%r) with scopes %s", key_id, name, ",".join(chosen))
        return NewApiKey(record.view(), secret)

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            return [record.view() for record in self._api_keys.all()]

    def revoke_key(self, key_id: str) -> None:
        with self._lock:
            record = self._api_keys.get(key_id)
            if record is None:
                raise ApiKeyNotFound(key_id)
            if record.revoked_at is not None:
                return  # revoked before: it keeps its first time
            now = self._wall_clock()
            self._write([RevokeApiKey(key_id, now)])
            self._api_keys.put(replace(record, revoked_at=now))
        log.info("revoked API key %s", key_id)

    # -- internals ---------------------------------------------------------------------

    def _write(self, changes: list[Change], now: float | None = None) -> None:
        """Journal ``changes`` in one transaction; a failure becomes ``StorageFailed``.

        With ``now`` (a submit's time), keys that expired since the last such
        write are forgotten on disk in the same transaction.
        """
        if now is not None and self._keys_expired:
            changes = [*changes, ForgetKeys(now)]
        if not changes:
            return
        try:
            self._journal.write(changes)
        except Exception as exc:
            log.error("journal write failed: %r", exc)
            raise StorageFailed(f"{type(exc).__name__}: {exc}") from None
        if now is not None:
            self._keys_expired = False

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

    def _view(self, record: FormulaRecord) -> FormulaView:
        if record.processed_at is not None:
            status = PROCESSED
        else:
            info = self._queue.info(record.message_id)
            status = FAILED if info is not None and info.state == DEAD else QUEUED
        return view(record, status)

    def _to_wall(self, moment: float) -> float:
        """A time on the queue's monotonic clock as the wall-clock time it stands for."""
        return self._wall_clock() + (moment - self._clock())
