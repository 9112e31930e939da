"""One contract, two transports: the broker object itself, and the same object
through a real ``multiprocessing.managers`` server and ``BrokerClient``.

Run through the manager, these catch a method missing from ``EXPOSED``, a
result or an error that does not pickle, and an error that loses its fields.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.errors import (
    DuplicateFormula,
    FormulaNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    MessageNotFound,
    QueueFull,
    StaleReceipt,
)
from broker.formula import parse_formula
from broker.interface import ConsumerBroker, IdempotencyKey, Submission, SubmissionBroker
from broker.manager import make_server
from broker.service import EXPOSED, Broker
from tests.conftest import FakeClock
from tests.support import environment


def make_broker(clock: FakeClock, wall_clock: FakeClock) -> Broker:
    ids = (f"id-{n:06d}-padding-xyz" for n in itertools.count(1))
    return Broker(
        queue_capacity=3,
        visibility_timeout=30.0,
        max_deliveries=2,
        clock=clock,
        wall_clock=wall_clock,
        new_id=lambda: next(ids),
    )


@pytest.fixture(params=["object", "manager"])
def remote(
    request: pytest.FixtureRequest, clock: FakeClock, wall_clock: FakeClock
) -> Iterator[Any]:
    broker = make_broker(clock, wall_clock)
    if request.param == "object":
        yield broker
        return
    with environment() as env:
        settings = env.settings()
        server = make_server(broker, settings)
        thread = threading.Thread(target=serve, args=(server,), daemon=True)
        thread.start()
        client = BrokerClient(settings)
        try:
            yield client
        finally:
            client.close()
            server.stop_event.set()
            thread.join(5)
            server.listener.close()


def serve(server: Any) -> None:
    # serve_forever ends with sys.exit(0), meant for a process of its own.
    with contextlib.suppress(SystemExit):
        server.serve_forever()


def draft(name: str, *materials: tuple[str, str]) -> Any:
    parts = ", ".join(f'{{"name": "{m}", "concentration": {c}}}' for m, c in materials)
    return parse_formula(f'{{"name": "{name}", "materials": [{parts}]}}'.encode())


ROSE = draft("Rose", ("Rose Absolute", "15.5"), ("Musk", "0.000001"))


def test_both_transports_satisfy_the_protocols(remote) -> None:
    assert isinstance(remote, Broker | BrokerClient)
    for name in ("ping", "submit", "get_formula", "list_formulas", "stats"):
        assert callable(getattr(remote, name)) and name in EXPOSED
    for name in ("receive", "complete", "ack", "nack", "extend"):
        assert callable(getattr(remote, name)) and name in EXPOSED
    _typed_api: SubmissionBroker = remote
    _typed_worker: ConsumerBroker = remote


def test_submit_then_read_back_exactly(remote) -> None:
    assert remote.ping() is True
    formula = remote.submit(ROSE).formula
    assert remote.get_formula(formula.id) == formula
    assert [m.concentration for m in formula.materials] == [Decimal("15.5"), Decimal("0.000001")]
    page = remote.list_formulas(10)
    assert page.items == (formula,) and page.next_cursor is None


def test_errors_cross_with_their_fields(remote) -> None:
    formula = remote.submit(ROSE, IdempotencyKey("k", "d")).formula
    with pytest.raises(DuplicateFormula) as dup:
        remote.submit(ROSE)
    assert (dup.value.existing_id, dup.value.fingerprint) == (formula.id, formula.fingerprint)
    with pytest.raises(IdempotencyKeyReused):
        remote.submit(ROSE, IdempotencyKey("k", "other"))
    with pytest.raises(FormulaNotFound):
        remote.get_formula("nope")
    with pytest.raises(InvalidCursor):
        remote.list_formulas(10, "nope")
    with pytest.raises(StaleReceipt):
        remote.nack("nope.nope")
    with pytest.raises(MessageNotFound):
        remote.message_info("nope")


def test_submit_many_answers_each_submit_as_if_it_were_alone(remote) -> None:
    other = draft("Other", ("Vetiver", "3"))
    outcomes = remote.submit_many(
        [
            (ROSE, IdempotencyKey("k", "d")),
            (ROSE, None),
            (other, None),
            (other, IdempotencyKey("k", "another body")),
        ]
    )
    first, duplicate, second, reused = outcomes
    assert isinstance(first, Submission) and isinstance(second, Submission)
    assert isinstance(duplicate, DuplicateFormula) and duplicate.existing_id == first.formula.id
    assert isinstance(reused, IdempotencyKeyReused)
    assert remote.stats().formulas == 2 and remote.stats().published == 2
    assert remote.submit_many([]) == []


def test_concurrent_submits_each_get_their_own_answer(remote) -> None:
    # Through the client these share round trips (the queue holds 3); each thread still gets the
    # answer to its own submit, and a make-up is stored once.
    makeups = [draft(f"F{i}", (f"M{i % 3}", "1")) for i in range(16)]
    results: dict[int, object] = {}
    barrier = threading.Barrier(16)

    def submit(i: int) -> None:
        barrier.wait()
        try:
            results[i] = remote.submit(makeups[i]).formula.fingerprint
        except DuplicateFormula as exc:
            results[i] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    accepted = [r for r in results.values() if isinstance(r, str)]
    assert len(results) == 16 and sorted(accepted) == sorted({d.fingerprint for d in makeups})
    for i, outcome in results.items():
        if isinstance(outcome, DuplicateFormula):
            assert outcome.fingerprint == makeups[i].fingerprint
    assert remote.stats().formulas == 3 and remote.stats().duplicates == 13


def test_capacity_refuses_with_queue_full(remote) -> None:
    for i in range(3):
        remote.submit(draft(f"F{i}", (f"M{i}", "1")))
    with pytest.raises(QueueFull) as full:
        remote.submit(draft("F4", ("M4", "1")))
    assert full.value.capacity == 3
    assert remote.stats().refused_capacity == 1


def test_a_delivery_is_leased_completed_and_shown_processed(remote) -> None:
    formula = remote.submit(ROSE).formula
    [delivery] = remote.receive("w1", 5, None, 0)
    assert (delivery.formula_id, delivery.delivery) == (formula.id, 1)
    assert remote.extend(delivery.receipt, 60) > 0
    summary = {"material_count": 2, "total_concentration": Decimal("15.500001")}
    assert remote.complete(delivery.receipt, summary) is True
    done = remote.get_formula(formula.id)
    assert done.status == "processed" and done.summary == summary
    assert remote.ack(delivery.receipt) is False  # a repeated ack is harmless
    stats = remote.stats()
    assert (stats.acked, stats.processed, stats.depth, stats.in_flight) == (1, 1, 0, 0)


def test_expired_leases_redeliver_first_then_dead_letter_and_redrive(remote, clock) -> None:
    first = remote.submit(ROSE).formula
    second = remote.submit(draft("Other", ("Vetiver", "3"))).formula
    [lease] = remote.receive("w1", 1, None, 0)
    assert lease.formula_id == first.id
    clock.advance(31)
    [again] = remote.receive("w2", 1, None, 0)
    assert (again.formula_id, again.delivery) == (first.id, 2)
    with pytest.raises(StaleReceipt):
        remote.ack(lease.receipt)
    remote.nack(again.receipt, 0)  # the last allowed delivery: dead-lettered
    assert remote.get_formula(first.id).status == "failed"
    [dead] = remote.dead_letters(10)
    assert dead.message_id == first.message_id and dead.state == "dead"
    remote.redrive(first.message_id)
    assert remote.get_formula(first.id).status == "queued"
    got = remote.receive("w3", 10, None, 0)
    assert [d.formula_id for d in got] == [second.id, first.id]
    assert remote.redrive_all() == 0
    assert remote.message_info(first.message_id).state == "in_flight"


def test_a_batch_is_read_and_completed_in_one_call_each(remote, clock) -> None:
    first = remote.submit(ROSE).formula
    second = remote.submit(draft("Other", ("Vetiver", "3"))).formula
    got = remote.receive("w1", 10, None, 0)
    views = remote.get_formulas([d.formula_id for d in got] + ["nope"])
    assert [v.id if v else None for v in views] == [first.id, second.id, None]
    assert remote.receive("w1", 1, None, 0) == []
    remote.extend(got[0].receipt, 60)
    clock.advance(31)  # second's lease runs out and goes to w2
    [again] = remote.receive("w2", 10, None, 0)
    outcomes = remote.complete_many(
        [
            (got[0].receipt, {"n": Decimal("1.5")}),
            (got[0].receipt, {"n": 2}),  # the same message twice in one batch
            (got[1].receipt, {"n": 3}),  # stale: w2 holds it now
            (again.receipt, {"n": Decimal("4")}),
        ]
    )
    assert outcomes == ["completed", "already_acked", "stale", "completed"]
    assert remote.get_formula(first.id).summary == {"n": Decimal("1.5")}
    assert remote.get_formula(second.id).summary == {"n": Decimal("4")}
    assert remote.stats().processed == 2
