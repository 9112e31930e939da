"""The ack/retry queue's state machine: leases, redelivery, dead letters.

Pure and single-threaded: no locks, no waiting, no I/O. The broker facade
holds its lock around every call, journals what the drained events say, and
long-polls on a condition variable using :meth:`MessageQueue.next_due`. Time
comes only from the injected clock, so tests step it by hand.

A message is always in exactly one state::

    publish/redrive/restore ──> ready (fresh FIFO) ─┐
    expiry/nack/due delay ───> ready (redelivery) ──┴─ receive ─> in_flight
    in_flight ── ack ──> gone
    in_flight ── nack(delay > 0) ──> delayed ── due ──> ready (redelivery)
    in_flight ── expiry or nack, on its last allowed delivery ──> dead
    dead ── redrive ──> ready (fresh FIFO, delivery count back to 0)
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from broker.errors import MessageNotFound, QueueFull, StaleReceipt
from broker.interface import DEAD, DELAYED, IN_FLIGHT, READY, Delivery, MessageInfo

Clock = Callable[[], float]
"""Monotonic seconds."""

_RECEIPT_SEPARATOR: Final = "."


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Gauges (now) and counters (totals since this queue was created).

    Named as the same figures of ``broker.interface.BrokerStats``.
    """

    depth: int
    """Messages receivable now (ready)."""
    in_flight: int
    delayed: int
    dead: int
    published: int
    delivered: int
    """Every delivery, first ones and redeliveries alike."""
    redelivered: int
    """Deliveries after the first of a message."""
    acked: int
    nacked: int
    dead_lettered: int
    redriven: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message was handed to a consumer (its ``deliveries``-th delivery)."""

    message_id: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class Acked:
    """A message was acknowledged and is gone for good."""

    message_id: str


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A message used its last delivery; its formula has failed."""

    message_id: str
    formula_id: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class Redriven:
    """A dead letter went back to the queue with a fresh delivery count."""

    message_id: str


QueueEvent: TypeAlias = Delivered | Acked | DeadLettered | Redriven


class _Message:
    """One message's mutable state (queue-private)."""

    __slots__ = (
        "consumer",
        "deliveries",
        "due",
        "fingerprint",
        "formula_id",
        "message_id",
        "receipt",
        "stamp",
        "state",
    )

    def __init__(self, message_id: str, formula_id: str, fingerprint: str, deliveries: int) -> None:
        self.message_id = message_id
        self.formula_id = formula_id
        self.fingerprint = fingerprint
        self.deliveries = deliveries
        self.state: str = READY
        self.receipt: str | None = None
        self.consumer: str | None = None
        # Lease deadline when in flight, visibility time when delayed.
        self.due: float | None = None
        # Heap entries carry the stamp they were pushed with; any later
        # transition takes a new stamp, which is how stale entries are spotted.
        self.stamp = -1


# (due time, stamp, message id): the stamp both breaks ties in push order and
# invalidates entries lazily.
_HeapEntry: TypeAlias = tuple[float, int, str]


class MessageQueue:
    """At-least-once queue with leases, redelivery priority and dead letters.

    Structures: a dict of every message ever received by id, and one of the
    messages never received yet; two FIFO deques of ready ids (redelivery
    first, then fresh); a min-heap of lease deadlines and one of delayed
    visibility times, both with lazy invalidation; an insertion-ordered dict
    of dead ids (oldest first). Gauges and totals are plain counters.

    A message that nobody has received yet is only its formula id and
    fingerprint, a plain tuple that CPython's collector stops tracking; its
    ``_Message`` is made at its first delivery. A backlog of a million unread
    messages then costs the broker's full garbage collections nothing, where
    a million objects made each one walk them all with every submit in
    flight waiting.

    Every operation whose answer depends on the time first promotes what is
    due by now ("+ P" below): expired leases go to the redelivery queue (or to
    the dead letters on their last allowed delivery) and due delayed messages to
    the redelivery queue, in due-time order. That costs O(e log h) for the e
    heap entries due, h being the heap size; each entry is popped once, so it is
    O(log h) amortised per lease or delay. Stale entries (left by ack, nack and
    extend) stay in the lease heap until their old deadline passes, so h is
    bounded by the in-flight and delayed messages plus the acks, nacks and
    extends of the last lease period. No operation scans the queue or the
    in-flight messages.

    Costs, with k messages returned and d dead letters:

    - ``publish``, ``has_room``: O(1) + P
    - ``unpublish``, ``restore``, ``drain_events``, properties: O(1)
    - ``receive``: O(k log h) + P
    - ``ack``, ``nack``, ``extend``: O(log h) + P; ``lease``: O(1) + P
    - ``has_visible``, ``stats``, ``info``: O(1) + P
    - ``next_due``: O(1), plus O(log h) per stale heap top it discards
    - ``dead_letters(limit)``: O(limit) + P, O(d) + P without a limit
    - ``redrive``: O(1) + P; ``redrive_all``: O(d) + P

    Events (:data:`QueueEvent`) accumulate until :meth:`drain_events`; the
    caller drains them after every mutating call.
    """

    def __init__(
        self,
        *,
        capacity: int,
        visibility_timeout: float,
        max_deliveries: int,
        clock: Clock,
        new_token: Callable[[], str] | None = None,
    ) -> None:
        """Create an empty queue.

        ``capacity`` bounds live messages (ready, in flight, delayed);
        ``visibility_timeout`` is the default lease in seconds;
        ``max_deliveries`` is how many deliveries a message gets before it is
        dead-lettered. ``new_token`` makes the random part of receipts (it must
        not contain ``"."``); by default ``secrets.token_urlsafe(12)``.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        _check_positive("visibility_timeout", visibility_timeout)
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        self._capacity = capacity
        self._visibility_timeout = float(visibility_timeout)
        self._max_deliveries = max_deliveries
        self._clock = clock
        self._new_token = new_token if new_token is not None else _random_token

        self._messages: dict[str, _Message] = {}
        self._unread: dict[str, tuple[str, str]] = {}  # id -> (formula id, fingerprint)
        self._fresh: deque[str] = deque()
        self._redelivery: deque[str] = deque()
        self._leases: list[_HeapEntry] = []
        self._delayed: list[_HeapEntry] = []
        self._dead: dict[str, None] = {}
        self._stamps = itertools.count()
        self._events: list[QueueEvent] = []

        self._in_flight = 0
        self._delayed_count = 0
        self._published = 0
        self._delivered = 0
        self._redelivered = 0
        self._acked = 0
        self._nacked = 0
        self._dead_lettered = 0
        self._redriven = 0

    @property
    def capacity(self) -> int:
        """Live messages the queue holds before refusing publishes."""
        return self._capacity

    @property
    def visibility_timeout(self) -> float:
        """Default lease length in seconds."""
        return self._visibility_timeout

    @property
    def max_deliveries(self) -> int:
        """Deliveries a message gets before it is dead-lettered."""
        return self._max_deliveries

    # -- publishing ---------------------------------------------------------

    def has_room(self) -> bool:
        """True if one more message can be published (dead letters don't count)."""
        self._promote_due(self._clock())
        return self._live() < self._capacity

    def publish(self, message_id: str, formula_id: str, fingerprint: str) -> None:
        """Append a new message to the fresh FIFO.

        Raises ``ValueError`` if ``message_id`` is already known (live or dead)
        and ``QueueFull`` if the queue holds ``capacity`` live messages.
        """
        if message_id in self._messages or message_id in self._unread:
            raise ValueError(f"message {message_id!r} already exists")
        if not self.has_room():
            raise QueueFull(self._capacity)
        self._unread[message_id] = (formula_id, fingerprint)
        self._fresh.append(message_id)
        self._published += 1

    def unpublish(self, message_id: str) -> None:
        """Undo the most recent publish, which must still be undelivered.

        Used to roll back an atomic submit. Raises ``ValueError`` if
        ``message_id`` is not the newest fresh message.
        """
        if not self._fresh or self._fresh[-1] != message_id:
            raise ValueError(f"message {message_id!r} is not the newest fresh message")
        self._fresh.pop()
        if self._unread.pop(message_id, None) is None:
            del self._messages[message_id]  # a redriven one
        self._published -= 1

    def restore(
        self, message_id: str, formula_id: str, fingerprint: str, deliveries: int, dead: bool
    ) -> None:
        """Rebuild one message after a restart, keeping its delivery count.

        A live message becomes visible at once: to the redelivery queue if it
        was delivered before, else to the fresh FIFO, in call order. A dead one
        joins the dead letters (oldest first, in call order). Capacity is not
        checked, so that a restart never drops a message; no event is recorded
        and no total counts it.
        """
        if message_id in self._messages or message_id in self._unread:
            raise ValueError(f"message {message_id!r} already exists")
        if deliveries < 0:
            raise ValueError(f"deliveries must not be negative, not {deliveries}")
        if deliveries == 0 and not dead:
            self._unread[message_id] = (formula_id, fingerprint)
            self._fresh.append(message_id)
            return
        message = _Message(message_id, formula_id, fingerprint, deliveries)
        self._messages[message_id] = message
        if dead:
            message.state = DEAD
            self._dead[message_id] = None
        elif deliveries > 0:
            self._redelivery.append(message_id)
        else:
            self._fresh.append(message_id)

    # -- consuming ------------------------------------------------------------

    def receive(
        self, consumer: str, max_messages: int, visibility_timeout: float | None = None
    ) -> list[Delivery]:
        """Lease up to ``max_messages`` visible messages to ``consumer``; never waits.

        Redeliveries come first (FIFO), then fresh messages (FIFO). Each one's
        delivery count goes up by one and it gets a new receipt, leased until
        now + ``visibility_timeout`` (default: the queue's). Returns an empty
        list when nothing is visible.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        lease = self._visibility_timeout if visibility_timeout is None else visibility_timeout
        _check_positive("visibility_timeout", lease)
        now = self._clock()
        self._promote_due(now)
        deadline = now + lease
        deliveries: list[Delivery] = []
        while len(deliveries) < max_messages:
            source = self._redelivery or self._fresh
            if not source:
                break
            receipt = self._new_receipt(source[0])
            message_id = source.popleft()
            message = self._messages.get(message_id) or self._first_read(message_id)
            message.deliveries += 1
            self._lease(message, receipt, consumer, deadline)
            self._delivered += 1
            if message.deliveries > 1:
                self._redelivered += 1
            self._events.append(Delivered(message.message_id, message.deliveries))
            deliveries.append(
                Delivery(
                    message_id=message.message_id,
                    formula_id=message.formula_id,
                    fingerprint=message.fingerprint,
                    receipt=receipt,
                    delivery=message.deliveries,
                    lease_expires_at=deadline,
                )
            )
        return deliveries

    def ack(self, receipt: str) -> bool:
        """Remove the message leased under ``receipt`` for good.

        True if it was removed; False if the message is already gone (a repeated
        ack changes nothing). Raises ``StaleReceipt``, changing nothing, if the
        message still exists but ``receipt`` is not its current lease (it
        expired, whether or not it was redelivered since), or if the receipt is
        malformed.
        """
        message_id = _message_id_of(receipt)
        self._promote_due(self._clock())
        message = self._messages.get(message_id)
        if message is None:
            if message_id in self._unread:  # never delivered: no receipt is its lease
                raise StaleReceipt(receipt)
            return False
        self._check_current(message, receipt)
        self._end_lease(message)
        del self._messages[message_id]
        self._acked += 1
        self._events.append(Acked(message_id))
        return True

    def lease(self, receipt: str) -> MessageInfo | None:
        """The message leased under ``receipt``, checked as ``ack`` checks it.

        None if the message is already gone; ``StaleReceipt`` if ``receipt`` is
        not its current lease. Changes nothing: the broker asks before it
        records a result and acks, so that a stale receipt records nothing.
        """
        message_id = _message_id_of(receipt)
        self._promote_due(self._clock())
        message = self._messages.get(message_id)
        if message is None:
            if message_id in self._unread:
                raise StaleReceipt(receipt)
            return None
        self._check_current(message, receipt)
        return _info(message)

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        """Give the message back: visible again at once, or after ``delay`` seconds.

        A message on its last allowed delivery is dead-lettered instead. A
        redelivered message goes ahead of fresh ones. Raises ``StaleReceipt``
        unless ``receipt`` is the message's current lease.
        """
        if not math.isfinite(delay):
            raise ValueError(f"delay must be finite, not {delay}")
        now = self._clock()
        self._promote_due(now)
        message = self._current(receipt)
        self._end_lease(message)
        self._nacked += 1
        if message.deliveries >= self._max_deliveries:
            self._dead_letter(message)
        elif delay <= 0:
            self._make_ready(message)
        else:
            message.state = DELAYED
            message.due = now + delay
            message.stamp = next(self._stamps)
            heapq.heappush(self._delayed, (message.due, message.stamp, message.message_id))
            self._delayed_count += 1

    def extend(self, receipt: str, seconds: float) -> float:
        """Heartbeat: the lease now ends ``seconds`` from now; returns the new deadline.

        Raises ``StaleReceipt`` unless ``receipt`` is the current lease and has
        not expired by the clock.
        """
        _check_positive("seconds", seconds)
        now = self._clock()
        self._promote_due(now)
        message = self._current(receipt)
        consumer = message.consumer
        self._end_lease(message)
        self._lease(message, receipt, consumer, now + seconds)
        return now + seconds

    # -- looking ----------------------------------------------------------------

    def next_due(self) -> float | None:
        """Earliest clock time at which a lease expires or a delayed message shows.

        None if nothing is in flight or delayed. The facade's long poll sleeps
        at most until then.
        """
        tops = [self._valid_top(self._leases), self._valid_top(self._delayed)]
        due = [top[0] for top in tops if top is not None]
        return min(due) if due else None

    def has_visible(self) -> bool:
        """True if a ``receive`` now would return a message."""
        self._promote_due(self._clock())
        return bool(self._redelivery or self._fresh)

    def info(self, message_id: str) -> MessageInfo | None:
        """The message's current state, or None if there is no such message."""
        self._promote_due(self._clock())
        message = self._messages.get(message_id)
        if message is not None:
            return _info(message)
        unread = self._unread.get(message_id)
        if unread is None:
            return None
        formula_id, fingerprint = unread
        return MessageInfo(
            message_id=message_id,
            formula_id=formula_id,
            fingerprint=fingerprint,
            state=READY,
            deliveries=0,
            consumer=None,
            visible_at=None,
        )

    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        """Dead letters, oldest first; at most ``limit`` of them if given."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        self._promote_due(self._clock())
        ids = itertools.islice(self._dead, limit)
        return [_info(self._messages[message_id]) for message_id in ids]

    def stats(self) -> QueueStats:
        """Gauges now and totals since this queue was created."""
        self._promote_due(self._clock())
        return QueueStats(
            depth=len(self._redelivery) + len(self._fresh),
            in_flight=self._in_flight,
            delayed=self._delayed_count,
            dead=len(self._dead),
            published=self._published,
            delivered=self._delivered,
            redelivered=self._redelivered,
            acked=self._acked,
            nacked=self._nacked,
            dead_lettered=self._dead_lettered,
            redriven=self._redriven,
        )

    def drain_events(self) -> list[QueueEvent]:
        """Return the events recorded since the last drain, and forget them."""
        events, self._events = self._events, []
        return events

    # -- dead letters -------------------------------------------------------------

    def redrive(self, message_id: str) -> None:
        """Send a dead letter to the fresh FIFO's tail with its delivery count at 0.

        Raises ``MessageNotFound`` if ``message_id`` is not a dead letter.
        Capacity is not checked: the message already exists.
        """
        self._promote_due(self._clock())
        if message_id not in self._dead:
            raise MessageNotFound(message_id)
        del self._dead[message_id]
        message = self._messages[message_id]
        message.state = READY
        message.deliveries = 0
        self._fresh.append(message_id)
        self._redriven += 1
        self._events.append(Redriven(message_id))

    def redrive_all(self) -> int:
        """Redrive every dead letter, oldest first; returns how many."""
        self._promote_due(self._clock())
        ids = list(self._dead)
        for message_id in ids:
            self.redrive(message_id)
        return len(ids)

    # -- transitions ----------------------------------------------------------------

    def _promote_due(self, now: float) -> None:
        # Take both heaps in due-time order so that the redelivery queue stays
        # in the order things became visible again.
        leases, delayed = self._leases, self._delayed
        while True:
            lease_due = leases[0][0] if leases else math.inf
            delay_due = delayed[0][0] if delayed else math.inf
            if min(lease_due, delay_due) > now:
                return
            heap = leases if lease_due <= delay_due else delayed
            _, stamp, message_id = heapq.heappop(heap)
            message = self._messages.get(message_id)
            if message is None or message.stamp != stamp:
                continue
            if heap is leases:
                self._end_lease(message)
                if message.deliveries >= self._max_deliveries:
                    self._dead_letter(message)
                else:
                    self._make_ready(message)
            else:
                self._delayed_count -= 1
                self._make_ready(message)

    def _lease(
        self, message: _Message, receipt: str, consumer: str | None, deadline: float
    ) -> None:
        message.state = IN_FLIGHT
        message.receipt = receipt
        message.consumer = consumer
        message.due = deadline
        message.stamp = next(self._stamps)
        heapq.heappush(self._leases, (deadline, message.stamp, message.message_id))
        self._in_flight += 1

    def _end_lease(self, message: _Message) -> None:
        # The heap entry is left behind; the new stamp marks it stale.
        message.receipt = None
        message.consumer = None
        message.due = None
        message.stamp = next(self._stamps)
        self._in_flight -= 1

    def _make_ready(self, message: _Message) -> None:
        message.state = READY
        message.due = None
        message.stamp = next(self._stamps)
        self._redelivery.append(message.message_id)

    def _dead_letter(self, message: _Message) -> None:
        message.state = DEAD
        self._dead[message.message_id] = None
        self._dead_lettered += 1
        self._events.append(
            DeadLettered(message.message_id, message.formula_id, message.deliveries)
        )

    def _current(self, receipt: str) -> _Message:
        message = self._messages.get(_message_id_of(receipt))
        if message is None:  # gone, or never delivered
            raise StaleReceipt(receipt)
        self._check_current(message, receipt)
        return message

    @staticmethod
    def _check_current(message: _Message, receipt: str) -> None:
        if message.state != IN_FLIGHT or message.receipt != receipt:
            raise StaleReceipt(receipt)

    def _new_receipt(self, message_id: str) -> str:
        token = self._new_token()
        if not token or _RECEIPT_SEPARATOR in token:
            raise ValueError(f"receipt token {token!r} is empty or contains {_RECEIPT_SEPARATOR!r}")
        return f"{message_id}{_RECEIPT_SEPARATOR}{token}"

    def _valid_top(self, heap: list[_HeapEntry]) -> _HeapEntry | None:
        while heap:
            _, stamp, message_id = heap[0]
            message = self._messages.get(message_id)
            if message is not None and message.stamp == stamp:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _first_read(self, message_id: str) -> _Message:
        """Make the ``_Message`` of a message nobody has received yet."""
        formula_id, fingerprint = self._unread.pop(message_id)
        message = _Message(message_id, formula_id, fingerprint, 0)
        self._messages[message_id] = message
        return message

    def _live(self) -> int:
        return len(self._messages) + len(self._unread) - len(self._dead)


def _random_token() -> str:
    return secrets.token_urlsafe(12)


def _message_id_of(receipt: str) -> str:
    message_id, separator, token = receipt.rpartition(_RECEIPT_SEPARATOR)
    if not separator or not message_id or not token:
        raise StaleReceipt(receipt)
    return message_id


def _info(message: _Message) -> MessageInfo:
    return MessageInfo(
        message_id=message.message_id,
        formula_id=message.formula_id,
        fingerprint=message.fingerprint,
        state=message.state,
        deliveries=message.deliveries,
        consumer=message.consumer,
        visible_at=message.due,
    )


def _check_positive(name: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {seconds}")
