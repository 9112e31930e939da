"""The embedded engine's broker object, on a stepped clock: submit, dedupe, capacity, keys."""

from __future__ import annotations

import gc
import threading
from decimal import Decimal

import pytest

from broker.engines.embedded import EmbeddedBroker
from broker.engines.embedded.queue import MessageQueue
from broker.errors import (
    DuplicateFormula,
    FormulaNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidSummary,
    QueueFull,
    StaleReceipt,
)
from broker.formula import FormulaDraft, parse_formula
from broker.interface import IdempotencyKey


def draft(*materials: tuple[str, str], name: str = "F") -> FormulaDraft:
    parts = ", ".join(f'{{"name": "{m}", "concentration": {c}}}' for m, c in materials)
    return parse_formula(f'{{"name": "{name}", "materials": [{parts}]}}'.encode())


ROSE = draft(("Rose", "10"), ("Musk", "2.5"))


class FailingQueue(MessageQueue):
    """A queue whose publish step fails (after the formula was stored) while ``failing``."""

    failing = True

    def publish(self, message_id: str, formula_id: str, fingerprint: str) -> None:
        if self.failing:
            raise RuntimeError("disk on fire")
        super().publish(message_id, formula_id, fingerprint)


def test_a_failed_publish_leaves_store_index_and_keys_exactly_as_before(clock, wall_clock) -> None:
    queue = FailingQueue(capacity=10, visibility_timeout=30, max_deliveries=3, clock=clock)
    broker = EmbeddedBroker(queue=queue, clock=clock, wall_clock=wall_clock)
    with pytest.raises(RuntimeError):
        broker.submit(ROSE, IdempotencyKey("k", "digest"))
    stats = broker.stats()
    assert stats.formulas == 0 and stats.published == 0 and stats.submitted == 0
    assert broker.list_formulas(10).items == ()
    # Neither the index nor the key remembers the failed submit: once the
    # fault is gone the same make-up and key are accepted as new.
    queue.failing = False
    accepted = broker.submit(ROSE, IdempotencyKey("k", "digest"))
    assert not accepted.replayed
    assert broker.stats().formulas == 1 and broker.stats().published == 1


def test_a_known_make_up_raises_duplicate_and_changes_nothing(broker) -> None:
    first = broker.submit(ROSE).formula
    with pytest.raises(DuplicateFormula) as raised:
        broker.submit(draft(("musk", "2.50"), ("ROSE", "1e1"), name="Other"))
    assert raised.value.existing_id == first.id
    assert raised.value.fingerprint == first.fingerprint
    assert broker.stats().formulas == 1 and broker.stats().published == 1


def test_a_full_queue_refuses_the_whole_submit(clock, wall_clock) -> None:
    broker = EmbeddedBroker(queue_capacity=2, clock=clock, wall_clock=wall_clock)
    broker.submit(draft(("A", "1")))
    broker.submit(draft(("B", "1")))
    with pytest.raises(QueueFull):
        broker.submit(draft(("C", "1")))
    assert broker.stats().formulas == 2
    # Once a message is acked there is room again.
    [delivery] = broker.receive("w", 1)
    broker.ack(delivery.receipt)
    broker.submit(draft(("C", "1")))


def test_concurrent_identical_submits_store_once_and_publish_once(broker) -> None:
    results: list[str] = []
    barrier = threading.Barrier(32)

    def submit() -> None:
        barrier.wait()
        try:
            broker.submit(ROSE)
            results.append("accepted")
        except DuplicateFormula:
            results.append("duplicate")

    threads = [threading.Thread(target=submit) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("accepted") == 1 and results.count("duplicate") == 31
    assert broker.stats().formulas == 1 and broker.stats().published == 1


def test_an_idempotency_key_replays_its_first_answer(broker) -> None:
    key = IdempotencyKey("k", "d1")
    first = broker.submit(ROSE, key)
    again = broker.submit(ROSE, key)
    assert again.replayed and again.formula == first.formula
    with pytest.raises(IdempotencyKeyReused):
        broker.submit(ROSE, IdempotencyKey("k", "d2"))
    assert broker.stats().published == 1


def test_idempotency_keys_expire_after_their_ttl(clock, wall_clock) -> None:
    broker = EmbeddedBroker(idempotency_ttl=60, clock=clock, wall_clock=wall_clock)
    broker.submit(ROSE, IdempotencyKey("k", "d1"))
    wall_clock.advance(61)
    with pytest.raises(DuplicateFormula) as raised:
        broker.submit(ROSE, IdempotencyKey("k", "d1"))
    assert not raised.value.replayed


def test_completing_records_the_summary_once_and_acks(broker, wall_clock) -> None:
    formula = broker.submit(ROSE).formula
    [delivery] = broker.receive("w", 1)
    assert broker.get_formula(formula.id).deliveries == 1
    assert broker.complete(delivery.receipt, {"total": Decimal("12.5")})
    done = broker.get_formula(formula.id)
    assert done.status == "processed" and done.summary == {"total": Decimal("12.5")}
    assert done.processed_at is not None
    wall_clock.advance(5)
    assert broker.complete(delivery.receipt, {"total": Decimal("99")}) is False
    assert broker.get_formula(formula.id) == done


def test_a_stale_receipt_cannot_complete(broker, clock) -> None:
    formula = broker.submit(ROSE).formula
    [first] = broker.receive("a", 1)
    clock.advance(31)
    [second] = broker.receive("b", 1)
    with pytest.raises(StaleReceipt):
        broker.complete(first.receipt, {"x": 1})
    assert broker.get_formula(formula.id).status == "queued"
    assert broker.complete(second.receipt, {"x": 2})
    assert broker.get_formula(formula.id).deliveries == 2


def test_a_message_out_of_deliveries_marks_its_formula_failed_until_redriven(broker, clock) -> None:
    formula = broker.submit(ROSE).formula
    for _ in range(3):
        [delivery] = broker.receive("w", 1)
        broker.nack(delivery.receipt)
    assert broker.get_formula(formula.id).status == "failed"
    [dead] = broker.dead_letters()
    assert dead.message_id == formula.message_id
    broker.redrive(formula.message_id)
    assert broker.get_formula(formula.id).status == "queued"
    [delivery] = broker.receive("w", 1)
    assert delivery.delivery == 1
    assert broker.complete(delivery.receipt, {})
    assert broker.get_formula(formula.id).status == "processed"


def test_receive_waits_for_a_publish_instead_of_spinning() -> None:
    broker = EmbeddedBroker()
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.extend(broker.receive("w", 1, wait_seconds=10)))
    waiting.start()
    broker.submit(ROSE)
    waiting.join(5)
    assert not waiting.is_alive() and len(got) == 1


def test_receive_returns_empty_when_nothing_arrives_in_time() -> None:
    assert EmbeddedBroker().receive("w", 1, wait_seconds=0.05) == []


def test_an_unknown_formula_is_not_found(broker) -> None:
    with pytest.raises(FormulaNotFound):
        broker.get_formula("nope")


@pytest.mark.parametrize("cursor", ["", "czI", "s1", "=" * 10, "czk5OTk5OTk5OTk", "MTIz" * 2000])
def test_a_cursor_the_broker_did_not_hand_out_is_refused(broker, cursor) -> None:
    broker.submit(ROSE)
    with pytest.raises(InvalidCursor):
        broker.list_formulas(10, cursor)


def test_a_summary_json_cannot_hold_is_refused_and_records_nothing(broker) -> None:
    formula = broker.submit(ROSE).formula
    [delivery] = broker.receive("w", 1)
    with pytest.raises(InvalidSummary):
        broker.complete(delivery.receipt, {"when": object()})
    assert broker.get_formula(formula.id).status == "queued"
    assert broker.complete(delivery.receipt, {"ok": True})


def test_a_batch_with_a_summary_json_cannot_hold_records_the_others(broker) -> None:
    a = broker.submit(ROSE).formula
    b = broker.submit(draft(("Oud", "1"))).formula
    got = broker.receive("w", 2)
    outcomes = broker.complete_many([(got[0].receipt, {"x": object()}), (got[1].receipt, {})])
    assert outcomes == ["invalid_summary", "completed"]
    assert broker.get_formula(a.id).status == "queued"
    assert broker.get_formula(b.id).status == "processed"


def test_what_the_broker_keeps_per_formula_is_never_walked_by_the_garbage_collector() -> None:
    # A full collection walks every object the collector tracks, with the
    # broker's lock held by whoever triggered it. The state kept per formula
    # (its record, its key's answer, its message while nobody has read it)
    # must not be among them, or the pause grows with every formula stored.
    broker = EmbeddedBroker()

    def submit(n: int) -> str:
        key = IdempotencyKey(f"k{n}", "d")
        return broker.submit(draft((f"Material {n}", "1"), name=f"F{n}"), key).formula.id

    def tracked() -> int:
        gc.collect()
        return len(gc.get_objects())

    def process(count: int) -> None:
        for _ in range(0, count, 100):
            receipts = [d.receipt for d in broker.receive("w", min(count, 100))]
            assert len(receipts) == min(count, 100)
            broker.complete_many([(receipt, {"ok": True}) for receipt in receipts])

    submit(0)
    process(1)  # everything made once, on first use, is made now
    before = tracked()
    ids = [submit(n) for n in range(1, 2_001)]
    process(1_000)  # half processed and acked; half waiting, never received
    assert {view.status for view in broker.get_formulas(ids)} == {"processed", "queued"}
    after = tracked()

    assert broker.stats().formulas == 2_001 and broker.stats().depth == 1_000
    assert after - before < 100, f"{after - before} more tracked objects for 2,000 formulas"


def test_submitting_and_processing_leave_no_reference_cycles_for_the_collector() -> None:
    # Garbage in a cycle waits for a collection, which runs with the broker's
    # lock held by whichever call set it off; garbage without one is freed at
    # once. Undo closures over the submit group once left 8-12 per submit.
    broker = EmbeddedBroker()
    new = [
        (draft((f"Material {n}", "1"), name=f"F{n}"), IdempotencyKey(f"k{n}", "d"))
        for n in range(200)
    ]
    again = [(d, None) for d, _ in new[:50]]
    broker.submit_many(new[:1])  # everything made once, on first use, is made now
    gc.collect()
    gc.disable()
    try:
        outcomes = broker.submit_many(new[1:100]) + broker.submit_many(new[100:] + again)
        receipts = [d.receipt for d in broker.receive("w", 100)]
        broker.complete_many([(receipt, {"ok": True}) for receipt in receipts])
        unreachable = gc.collect()
    finally:
        gc.enable()

    assert [type(o).__name__ for o in outcomes].count("DuplicateFormula") == 50
    assert unreachable == 0
