"""The queue's state machine, driven by a fake clock."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from broker.engines.embedded.queue import (
    Acked,
    DeadLettered,
    Delivered,
    Delivery,
    MessageQueue,
    QueueEvent,
    Redriven,
)
from broker.errors import MessageNotFound, QueueFull, StaleReceipt
from tests.conftest import FakeClock

LEASE = 30.0
MAX_DELIVERIES = 3


@pytest.fixture
def queue(clock: FakeClock) -> MessageQueue:
    return make_queue(clock)


def make_queue(clock: FakeClock, capacity: int = 10) -> MessageQueue:
    tokens = (f"t{n}" for n in itertools.count())
    return MessageQueue(
        capacity=capacity,
        visibility_timeout=LEASE,
        max_deliveries=MAX_DELIVERIES,
        clock=clock,
        new_token=lambda: next(tokens),
    )


def publish(queue: MessageQueue, *message_ids: str) -> None:
    for message_id in message_ids:
        queue.publish(message_id, f"formula-{message_id}", f"fp-{message_id}")


def receive_one(queue: MessageQueue, consumer: str = "w1") -> Delivery:
    [delivery] = queue.receive(consumer, 1)
    return delivery


def ids(deliveries: list[Delivery]) -> list[str]:
    return [delivery.message_id for delivery in deliveries]


def state_of(queue: MessageQueue, message_id: str) -> str | None:
    info = queue.info(message_id)
    return None if info is None else info.state


def exhaust(queue: MessageQueue, clock: FakeClock, message_id: str) -> None:
    """Deliver ``message_id`` (the only visible message) until its leases run out."""
    for _ in range(MAX_DELIVERIES):
        assert ids(queue.receive("w1", 1)) == [message_id]
        clock.advance(LEASE)


# -- order ----------------------------------------------------------------------


def test_fresh_messages_are_received_in_publish_order(queue: MessageQueue) -> None:
    publish(queue, "a", "b", "c", "d")
    assert ids(queue.receive("w1", 3)) == ["a", "b", "c"]
    assert ids(queue.receive("w2", 3)) == ["d"]
    assert queue.receive("w3", 3) == []


def test_a_delivery_carries_the_message_and_a_new_lease(clock: FakeClock) -> None:
    queue = MessageQueue(capacity=5, visibility_timeout=LEASE, max_deliveries=2, clock=clock)
    publish(queue, "a")
    delivery = receive_one(queue)
    assert delivery.message_id == "a"
    assert delivery.formula_id == "formula-a"
    assert delivery.fingerprint == "fp-a"
    assert delivery.delivery == 1
    assert delivery.lease_expires_at == clock.now + LEASE
    message_id, _, token = delivery.receipt.partition(".")
    assert message_id == "a"
    assert len(token) == 16
    assert pickle.loads(pickle.dumps(delivery)) == delivery


def test_each_delivery_gets_a_new_receipt(queue: MessageQueue, clock: FakeClock) -> None:
    publish(queue, "a")
    first = receive_one(queue)
    clock.advance(LEASE)
    second = receive_one(queue)
    assert first.receipt != second.receipt


def test_receive_leases_for_the_visibility_timeout_it_is_given(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    [delivery] = queue.receive("w1", 1, visibility_timeout=5.0)
    assert delivery.lease_expires_at == clock.now + 5.0
    clock.advance(5.0)
    assert ids(queue.receive("w2", 1)) == ["a"]


def test_receive_refuses_nonsense_arguments(queue: MessageQueue) -> None:
    with pytest.raises(ValueError):
        queue.receive("w1", 0)
    with pytest.raises(ValueError):
        queue.receive("w1", 1, visibility_timeout=0)


def test_receipts_work_for_message_ids_containing_dots(queue: MessageQueue) -> None:
    publish(queue, "a.b.c")
    assert queue.ack(receive_one(queue).receipt) is True


# -- redelivery and counting ----------------------------------------------------------


def test_an_expired_lease_is_redelivered_ahead_of_fresh_messages(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a", "b")
    receive_one(queue)
    clock.advance(LEASE)
    publish(queue, "c")
    assert ids(queue.receive("w2", 3)) == ["a", "b", "c"]


def test_a_message_is_still_leased_just_before_its_deadline(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    receive_one(queue)
    clock.advance(LEASE - 0.001)
    assert queue.receive("w2", 1) == []
    clock.advance(0.001)
    assert ids(queue.receive("w2", 1)) == ["a"]


def test_expired_leases_are_redelivered_in_the_order_they_expired(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a", "b")
    queue.receive("w1", 1, visibility_timeout=20)
    queue.receive("w1", 1, visibility_timeout=10)
    clock.advance(20)
    assert ids(queue.receive("w2", 2)) == ["b", "a"]


def test_the_delivery_count_rises_with_each_redelivery(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    counts = []
    for _ in range(MAX_DELIVERIES):
        counts.append(receive_one(queue).delivery)
        clock.advance(LEASE)
    assert counts == [1, 2, 3]


# -- dead letters ---------------------------------------------------------------------


def test_a_message_is_dead_lettered_when_its_last_lease_expires(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    exhaust(queue, clock, "a")
    assert queue.receive("w1", 1) == []
    assert state_of(queue, "a") == "dead"
    assert DeadLettered("a", "formula-a", MAX_DELIVERIES) in queue.drain_events()


def test_a_message_is_dead_lettered_when_its_last_delivery_is_nacked(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    for _ in range(MAX_DELIVERIES - 1):
        queue.nack(receive_one(queue).receipt)
    queue.nack(receive_one(queue).receipt, delay=60)
    assert state_of(queue, "a") == "dead"
    assert queue.next_due() is None
    assert [e for e in queue.drain_events() if isinstance(e, DeadLettered)] == [
        DeadLettered("a", "formula-a", MAX_DELIVERIES)
    ]


def test_dead_letters_are_listed_oldest_first_up_to_a_limit(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    exhaust(queue, clock, "a")
    publish(queue, "b")
    exhaust(queue, clock, "b")
    assert [info.message_id for info in queue.dead_letters()] == ["a", "b"]
    [oldest] = queue.dead_letters(limit=1)
    assert (oldest.message_id, oldest.state, oldest.deliveries) == ("a", "dead", MAX_DELIVERIES)
    assert (oldest.consumer, oldest.visible_at) == (None, None)


def test_redrive_sends_a_dead_letter_to_the_fresh_tail_with_its_count_reset(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    exhaust(queue, clock, "a")
    publish(queue, "b")
    queue.drain_events()
    queue.redrive("a")
    assert queue.drain_events() == [Redriven("a")]
    assert queue.dead_letters() == []
    [b, a] = queue.receive("w1", 2)
    assert (b.message_id, a.message_id) == ("b", "a")
    assert a.delivery == 1


def test_redrive_all_redrives_every_dead_letter_oldest_first(
    queue: MessageQueue, clock: FakeClock
) -> None:
    for message_id in ("a", "b"):
        publish(queue, message_id)
        exhaust(queue, clock, message_id)
    assert queue.redrive_all() == 2
    assert queue.redrive_all() == 0
    deliveries = queue.receive("w1", 5)
    assert [(d.message_id, d.delivery) for d in deliveries] == [("a", 1), ("b", 1)]


def test_redrive_of_a_message_that_is_not_dead_raises_message_not_found(
    queue: MessageQueue,
) -> None:
    publish(queue, "a")
    for message_id in ("a", "nope"):
        with pytest.raises(MessageNotFound) as raised:
            queue.redrive(message_id)
        assert raised.value.message_id == message_id


# -- ack and stale receipts -------------------------------------------------------------


def test_ack_removes_the_message_for_good(queue: MessageQueue, clock: FakeClock) -> None:
    publish(queue, "a")
    assert queue.ack(receive_one(queue).receipt) is True
    clock.advance(10 * LEASE)
    assert queue.receive("w1", 1) == []
    assert queue.info("a") is None


def test_a_repeated_ack_is_harmless(queue: MessageQueue) -> None:
    publish(queue, "a", "b")
    receipt = receive_one(queue).receipt
    assert queue.ack(receipt) is True
    stats = queue.stats()
    queue.drain_events()
    assert queue.ack(receipt) is False
    assert queue.stats() == stats
    assert queue.drain_events() == []


def test_an_ack_after_expiry_is_refused_even_before_redelivery(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    receipt = receive_one(queue).receipt
    clock.advance(LEASE)
    with pytest.raises(StaleReceipt) as raised:
        queue.ack(receipt)
    assert raised.value.receipt == receipt
    assert ids(queue.receive("w2", 1)) == ["a"]


def test_an_ack_after_redelivery_to_another_consumer_is_refused_and_changes_nothing(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    stale = receive_one(queue, "w1").receipt
    clock.advance(LEASE)
    current = receive_one(queue, "w2")
    info, stats = queue.info("a"), queue.stats()
    with pytest.raises(StaleReceipt):
        queue.ack(stale)
    assert (queue.info("a"), queue.stats()) == (info, stats)
    assert queue.ack(current.receipt) is True


@pytest.mark.parametrize(
    "use_receipt",
    [
        lambda queue, receipt: queue.ack(receipt),
        lambda queue, receipt: queue.nack(receipt),
        lambda queue, receipt: queue.extend(receipt, 60),
    ],
    ids=["ack", "nack", "extend"],
)
def test_a_receipt_whose_lease_expired_is_stale_for_every_operation(
    queue: MessageQueue,
    clock: FakeClock,
    use_receipt: Callable[[MessageQueue, str], object],
) -> None:
    publish(queue, "a")
    expired_waiting = receive_one(queue, "w1").receipt
    clock.advance(LEASE)
    with pytest.raises(StaleReceipt):
        use_receipt(queue, expired_waiting)
    redelivered = receive_one(queue, "w2")
    with pytest.raises(StaleReceipt):
        use_receipt(queue, expired_waiting)
    info = queue.info("a")
    assert info is not None
    assert (info.state, info.consumer, info.deliveries) == ("in_flight", "w2", 2)
    assert queue.ack(redelivered.receipt) is True


@pytest.mark.parametrize("receipt", ["", "no-separator", ".token", "a.", "a.forged"])
def test_malformed_or_forged_receipts_are_stale(queue: MessageQueue, receipt: str) -> None:
    publish(queue, "a")
    receive_one(queue)
    with pytest.raises(StaleReceipt):
        queue.ack(receipt)
    with pytest.raises(StaleReceipt):
        queue.nack(receipt)
    with pytest.raises(StaleReceipt):
        queue.extend(receipt, 1)


# -- nack and extend ------------------------------------------------------------------


def test_a_nack_without_delay_makes_the_message_visible_at_once_ahead_of_fresh(
    queue: MessageQueue,
) -> None:
    publish(queue, "a", "b")
    queue.nack(receive_one(queue).receipt)
    [again, fresh] = queue.receive("w2", 2)
    assert (again.message_id, again.delivery) == ("a", 2)
    assert fresh.message_id == "b"


def test_a_nack_with_delay_hides_the_message_until_due_then_puts_it_ahead_of_fresh(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a", "b")
    queue.nack(receive_one(queue).receipt, delay=10)
    info = queue.info("a")
    assert info is not None
    assert (info.state, info.visible_at) == ("delayed", clock.now + 10)
    clock.advance(9)
    assert queue.has_visible() is True
    publish(queue, "c")
    assert ids(queue.receive("w1", 5)) == ["b", "c"]
    assert queue.has_visible() is False
    clock.advance(1)
    assert queue.has_visible() is True
    publish(queue, "d")
    assert ids(queue.receive("w1", 5)) == ["a", "d"]


def test_extend_keeps_a_message_invisible_past_its_original_lease(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a")
    delivery = receive_one(queue)
    clock.advance(LEASE - 1)
    assert queue.extend(delivery.receipt, 20) == clock.now + 20
    clock.advance(19)
    assert queue.receive("w2", 1) == []
    assert state_of(queue, "a") == "in_flight"
    assert queue.ack(delivery.receipt) is True


def test_extend_may_shorten_a_lease(queue: MessageQueue, clock: FakeClock) -> None:
    publish(queue, "a")
    delivery = receive_one(queue)
    queue.extend(delivery.receipt, 1)
    clock.advance(1)
    assert ids(queue.receive("w2", 1)) == ["a"]


def test_nack_and_extend_refuse_nonsense_durations(queue: MessageQueue) -> None:
    publish(queue, "a")
    receipt = receive_one(queue).receipt
    with pytest.raises(ValueError):
        queue.extend(receipt, 0)
    with pytest.raises(ValueError):
        queue.nack(receipt, float("nan"))
    assert queue.ack(receipt) is True


# -- capacity, rollback, restore ------------------------------------------------------------


def test_a_full_queue_refuses_a_publish_with_queue_full(clock: FakeClock) -> None:
    queue = make_queue(clock, capacity=2)
    publish(queue, "a", "b")
    assert queue.has_room() is False
    with pytest.raises(QueueFull) as raised:
        publish(queue, "c")
    assert raised.value.capacity == 2
    assert queue.info("c") is None
    assert queue.stats().published == 2


def test_in_flight_and_delayed_messages_count_against_capacity(clock: FakeClock) -> None:
    queue = make_queue(clock, capacity=2)
    publish(queue, "a", "b")
    queue.nack(receive_one(queue).receipt, delay=5)
    receive_one(queue)
    with pytest.raises(QueueFull):
        publish(queue, "c")


def test_dead_letters_do_not_count_against_capacity(clock: FakeClock) -> None:
    queue = make_queue(clock, capacity=1)
    publish(queue, "a")
    exhaust(queue, clock, "a")
    assert queue.has_room() is True
    publish(queue, "b")
    assert queue.has_room() is False


def test_publishing_a_known_message_id_raises_value_error(queue: MessageQueue) -> None:
    publish(queue, "a")
    with pytest.raises(ValueError):
        publish(queue, "a")


def test_unpublish_rolls_back_the_newest_publish(queue: MessageQueue) -> None:
    publish(queue, "a", "b", "c")
    queue.unpublish("c")
    queue.unpublish("b")
    assert queue.info("b") is None
    assert queue.stats().published == 1
    assert ids(queue.receive("w1", 5)) == ["a"]
    assert queue.drain_events() == [Delivered("a", 1)]


def test_unpublish_refuses_anything_but_the_newest_fresh_message(queue: MessageQueue) -> None:
    publish(queue, "a", "b")
    with pytest.raises(ValueError):
        queue.unpublish("a")
    receive_one(queue)
    queue.receive("w1", 1)
    with pytest.raises(ValueError):
        queue.unpublish("b")


def test_restore_makes_live_messages_visible_redeliveries_first_in_call_order(
    queue: MessageQueue,
) -> None:
    queue.restore("f1", "formula-f1", "fp-f1", 0, dead=False)
    queue.restore("r1", "formula-r1", "fp-r1", 2, dead=False)
    queue.restore("d1", "formula-d1", "fp-d1", 3, dead=True)
    queue.restore("f2", "formula-f2", "fp-f2", 0, dead=False)
    queue.restore("r2", "formula-r2", "fp-r2", 1, dead=False)
    queue.restore("d2", "formula-d2", "fp-d2", 1, dead=True)
    deliveries = queue.receive("w1", 10)
    assert [(d.message_id, d.delivery) for d in deliveries] == [
        ("r1", 3),
        ("r2", 2),
        ("f1", 1),
        ("f2", 1),
    ]
    assert [(i.message_id, i.deliveries) for i in queue.dead_letters()] == [("d1", 3), ("d2", 1)]


def test_restore_records_no_events_and_counts_no_totals(queue: MessageQueue) -> None:
    queue.restore("a", "formula-a", "fp-a", 1, dead=False)
    queue.restore("b", "formula-b", "fp-b", 3, dead=True)
    assert queue.drain_events() == []
    stats = queue.stats()
    assert (stats.depth, stats.dead, stats.published, stats.dead_lettered) == (1, 1, 0, 0)
    with pytest.raises(ValueError):
        queue.restore("a", "formula-a", "fp-a", 0, dead=False)


def test_restore_ignores_capacity_so_that_a_restart_loses_nothing(clock: FakeClock) -> None:
    queue = make_queue(clock, capacity=1)
    queue.restore("a", "formula-a", "fp-a", 0, dead=False)
    queue.restore("b", "formula-b", "fp-b", 0, dead=False)
    assert queue.stats().depth == 2
    assert queue.has_room() is False


# -- looking: stats, info, next_due, events -----------------------------------------------


def test_stats_count_every_transition(queue: MessageQueue, clock: FakeClock) -> None:
    publish(queue, "a", "b", "c", "d")
    queue.ack(receive_one(queue).receipt)
    queue.nack(receive_one(queue).receipt, delay=5)
    receive_one(queue)
    stats = queue.stats()
    assert (stats.depth, stats.in_flight, stats.delayed, stats.dead) == (1, 1, 1, 0)
    assert (stats.published, stats.delivered, stats.redelivered) == (4, 3, 0)
    assert (stats.acked, stats.nacked, stats.dead_lettered, stats.redriven) == (1, 1, 0, 0)

    clock.advance(LEASE)
    deliveries = queue.receive("w2", 3)
    assert [(d.message_id, d.delivery) for d in deliveries] == [("b", 2), ("c", 2), ("d", 1)]
    queue.nack(deliveries[1].receipt)
    queue.nack(receive_one(queue).receipt)
    queue.redrive("c")
    stats = queue.stats()
    assert (stats.depth, stats.in_flight, stats.delayed, stats.dead) == (1, 2, 0, 0)
    assert (stats.published, stats.delivered, stats.redelivered) == (4, 7, 3)
    assert (stats.acked, stats.nacked, stats.dead_lettered, stats.redriven) == (1, 3, 1, 1)


def test_info_describes_each_live_state(queue: MessageQueue, clock: FakeClock) -> None:
    publish(queue, "a", "b", "c")
    queue.receive("w1", 1)
    queue.nack(receive_one(queue, "w2").receipt, delay=7)
    infos = {m: queue.info(m) for m in ("a", "b", "c")}
    assert [(i.state, i.consumer, i.visible_at) for i in infos.values() if i] == [
        ("in_flight", "w1", clock.now + LEASE),
        ("delayed", None, clock.now + 7),
        ("ready", None, None),
    ]
    assert queue.info("unknown") is None


def test_next_due_is_the_earliest_lease_deadline_or_delayed_visibility(
    queue: MessageQueue, clock: FakeClock
) -> None:
    assert queue.next_due() is None
    publish(queue, "a", "b", "c")
    assert queue.next_due() is None
    first = receive_one(queue)
    queue.nack(receive_one(queue).receipt, delay=50)
    assert queue.next_due() == clock.now + LEASE
    queue.extend(first.receipt, 60)
    assert queue.next_due() == clock.now + 50
    queue.ack(first.receipt)
    assert queue.next_due() == clock.now + 50
    clock.advance(50)
    assert queue.has_visible() is True
    assert queue.next_due() is None


def test_events_are_recorded_in_order_and_drained_once(
    queue: MessageQueue, clock: FakeClock
) -> None:
    publish(queue, "a", "b")
    receipt = receive_one(queue).receipt
    queue.ack(receipt)
    exhaust(queue, clock, "b")
    queue.redrive("b")
    expected: list[QueueEvent] = [
        Delivered("a", 1),
        Acked("a"),
        Delivered("b", 1),
        Delivered("b", 2),
        Delivered("b", 3),
    ]
    assert queue.drain_events() == [
        *expected,
        DeadLettered("b", "formula-b", 3),
        Redriven("b"),
    ]
    assert queue.drain_events() == []


def test_invalid_settings_are_refused(clock: FakeClock) -> None:
    for capacity, lease, max_deliveries in [(0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)]:
        with pytest.raises(ValueError):
            MessageQueue(
                capacity=capacity,
                visibility_timeout=lease,
                max_deliveries=max_deliveries,
                clock=clock,
            )


def test_settings_are_readable(queue: MessageQueue) -> None:
    assert (queue.capacity, queue.visibility_timeout, queue.max_deliveries) == (
        10,
        LEASE,
        MAX_DELIVERIES,
    )


# -- random operation sequences --------------------------------------------------------


class QueueMachine(RuleBasedStateMachine):
    """Random publish/receive/ack/nack/extend/expire/redrive/restore sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.queue = MessageQueue(
            capacity=6, visibility_timeout=10, max_deliveries=3, clock=self.clock
        )
        self.ids = (f"m{n}" for n in itertools.count())
        self.known: set[str] = set()
        self.acked: set[str] = set()
        self.receipts: list[str] = []
        self.restored = 0
        self.newest_publish: str | None = None
        self.events: dict[type, int] = {}

    def _record_events(self) -> None:
        for event in self.queue.drain_events():
            self.events[type(event)] = self.events.get(type(event), 0) + 1

    def _attempt(self, operation: Callable[[], object], message_id: str) -> None:
        """Run ``operation``; if it raises StaleReceipt, the message must be untouched."""
        before = self.queue.info(message_id)
        try:
            operation()
        except StaleReceipt:
            assert self.queue.info(message_id) == before

    @rule()
    def publish(self) -> None:
        message_id = next(self.ids)
        self.newest_publish = None
        if not self.queue.has_room():
            with pytest.raises(QueueFull):
                publish(self.queue, message_id)
            return
        publish(self.queue, message_id)
        self.known.add(message_id)
        self.newest_publish = message_id

    @precondition(lambda self: self.newest_publish is not None)
    @rule()
    def unpublish(self) -> None:
        assert self.newest_publish is not None
        self.queue.unpublish(self.newest_publish)
        self.known.discard(self.newest_publish)
        self.newest_publish = None

    @rule(dead=st.booleans(), deliveries=st.integers(0, 2))
    def restore(self, dead: bool, deliveries: int) -> None:
        message_id = next(self.ids)
        self.newest_publish = None
        self.queue.restore(message_id, "f", "fp", deliveries, dead)
        self.known.add(message_id)
        self.restored += 1

    @rule(consumer=st.sampled_from(["w1", "w2"]), count=st.integers(1, 4))
    def receive(self, consumer: str, count: int) -> None:
        self.newest_publish = None
        before = {m: self.queue.info(m) for m in self.known - self.acked}
        for delivery in self.queue.receive(consumer, count):
            assert delivery.message_id not in self.acked
            previous = before[delivery.message_id]
            assert previous is not None
            assert delivery.delivery == previous.deliveries + 1 <= 3
            self.receipts.append(delivery.receipt)
        self._record_events()

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        self.newest_publish = None
        receipt = data.draw(st.sampled_from(self.receipts))
        message_id = receipt.rpartition(".")[0]
        before = self.queue.info(message_id)
        try:
            removed = self.queue.ack(receipt)
        except StaleReceipt:
            assert before is not None
            assert self.queue.info(message_id) == before
        else:
            if removed:
                assert before is not None and before.state == "in_flight"
                self.acked.add(message_id)
            else:
                assert message_id in self.acked
            assert self.queue.info(message_id) is None
        self._record_events()

    @precondition(lambda self: self.receipts)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 0.0, 4.0, 15.0]))
    def nack(self, data: st.DataObject, delay: float) -> None:
        self.newest_publish = None
        receipt = data.draw(st.sampled_from(self.receipts))
        self._attempt(lambda: self.queue.nack(receipt, delay), receipt.rpartition(".")[0])
        self._record_events()

    @precondition(lambda self: self.receipts)
    @rule(data=st.data(), seconds=st.sampled_from([1.0, 10.0, 25.0]))
    def extend(self, data: st.DataObject, seconds: float) -> None:
        self.newest_publish = None
        receipt = data.draw(st.sampled_from(self.receipts))
        self._attempt(lambda: self.queue.extend(receipt, seconds), receipt.rpartition(".")[0])

    @rule(seconds=st.sampled_from([0.5, 4.0, 10.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(data=st.data())
    def redrive(self, data: st.DataObject) -> None:
        self.newest_publish = None
        dead = [info.message_id for info in self.queue.dead_letters()]
        if not dead:
            with pytest.raises(MessageNotFound):
                self.queue.redrive("m-none")
            return
        self.queue.redrive(data.draw(st.sampled_from(dead)))
        self._record_events()

    @rule()
    def redrive_all(self) -> None:
        self.newest_publish = None
        expected = self.queue.stats().dead
        assert self.queue.redrive_all() == expected
        self._record_events()

    @invariant()
    def every_message_is_in_exactly_one_state_and_the_figures_add_up(self) -> None:
        stats = self.queue.stats()
        infos = {m: self.queue.info(m) for m in self.known}
        by_state: dict[str, list[str]] = {"ready": [], "in_flight": [], "delayed": [], "dead": []}
        for message_id, info in infos.items():
            if message_id in self.acked:
                assert info is None
                continue
            assert info is not None, f"{message_id} was lost"
            by_state[info.state].append(message_id)
            assert info.deliveries <= 3
            if info.state in ("in_flight", "delayed"):
                assert info.visible_at is not None and info.visible_at > self.clock.now
            else:
                assert info.visible_at is None
            assert (info.consumer is not None) == (info.state == "in_flight")
        assert len(by_state["ready"]) == stats.depth
        assert len(by_state["in_flight"]) == stats.in_flight
        assert len(by_state["delayed"]) == stats.delayed
        assert len(by_state["dead"]) == stats.dead
        dead_letters = [info.message_id for info in self.queue.dead_letters()]
        assert sorted(dead_letters) == sorted(by_state["dead"])
        live = stats.depth + stats.in_flight + stats.delayed
        assert stats.published + self.restored == stats.acked + live + stats.dead
        assert self.queue.has_room() == (live < self.queue.capacity)
        assert self.queue.has_visible() == (stats.depth > 0)
        leased = [infos[m] for m in by_state["in_flight"] + by_state["delayed"]]
        due = min((i.visible_at for i in leased if i and i.visible_at), default=None)
        assert self.queue.next_due() == due

    @invariant()
    def events_match_the_totals(self) -> None:
        stats = self.queue.stats()  # promotes what is due, which may record events
        self._record_events()
        assert self.events.get(Delivered, 0) == stats.delivered
        assert self.events.get(Acked, 0) == stats.acked
        assert self.events.get(DeadLettered, 0) == stats.dead_lettered
        assert self.events.get(Redriven, 0) == stats.redriven

    def teardown(self) -> None:
        # Everything live must still be deliverable: wait out every lease and
        # delay, then receive and ack until nothing is left.
        self.clock.advance(1000)
        while deliveries := self.queue.receive("drain", 10):
            for delivery in deliveries:
                assert self.queue.ack(delivery.receipt) is True
        stats = self.queue.stats()
        assert (stats.depth, stats.in_flight, stats.delayed) == (0, 0, 0)
        assert stats.published + self.restored == stats.acked + stats.dead


QueueMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_operation_sequences_keep_the_queue_consistent = QueueMachine.TestCase


# -- scale -------------------------------------------------------------------------------


def test_operations_stay_correct_with_two_hundred_thousand_queued_messages(
    clock: FakeClock,
) -> None:
    queue = MessageQueue(
        capacity=1_000_000, visibility_timeout=LEASE, max_deliveries=5, clock=clock
    )
    for n in range(200_000):
        queue.publish(f"m{n}", f"f{n}", f"fp{n}")
    for _ in range(500):
        deliveries = queue.receive("w1", 10)
        for delivery in deliveries[:8]:
            queue.ack(delivery.receipt)
        queue.extend(deliveries[8].receipt, 60)
        queue.nack(deliveries[9].receipt, delay=5)
        queue.stats()
        queue.next_due()
        queue.has_visible()
        queue.drain_events()
    clock.advance(LEASE)
    assert len(queue.receive("w1", 1000)) == 1000
    stats = queue.stats()
    assert (stats.acked, stats.nacked, stats.in_flight) == (4000, 500, 1500)
    assert stats.depth == 200_000 - 5000 - 500


def test_lease_reports_the_current_holder_and_refuses_stale_receipts() -> None:
    clock = FakeClock()
    queue = MessageQueue(capacity=10, visibility_timeout=30, max_deliveries=5, clock=clock)
    queue.publish("m1", "f1", "fp")
    [first] = queue.receive("a", 1)
    info = queue.lease(first.receipt)
    assert info is not None and info.formula_id == "f1" and info.consumer == "a"
    clock.advance(31)
    with pytest.raises(StaleReceipt):
        queue.lease(first.receipt)
    [second] = queue.receive("b", 1)
    assert queue.ack(second.receipt)
    assert queue.lease(second.receipt) is None
