"""The consume loop and the handlers, driven step by step with a fake clock."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest

from broker.engines.embedded import EmbeddedBroker
from broker.formula import parse_formula
from broker.interface import FormulaView
from worker.consumer import Backoff, Consumer, Heartbeat
from worker.handlers import load_handler, summarise

SPEC_EXAMPLE = parse_formula(
    b'{"name": "Summer Breeze", "materials": [{"name": "Bergamot Oil", "concentration": 15.5},'
    b' {"name": "Lavender Absolute", "concentration": 10.0},'
    b' {"name": "Sandalwood", "concentration": 5.2}]}'
)


def consumer(broker: EmbeddedBroker, handler: Any = summarise, **kwargs: Any) -> Consumer:
    kwargs.setdefault("wait_seconds", 0)
    return Consumer(broker, handler, name="test", rng=random.Random(7), **kwargs)


def test_the_summary_handler_uses_exact_decimals(broker) -> None:
    formula = broker.submit(SPEC_EXAMPLE).formula
    assert summarise(formula) == {
        "material_count": 3,
        "total_concentration": Decimal("30.7"),
        "carrier_remainder": Decimal("69.3"),
    }


def test_handlers_are_loaded_by_import_path() -> None:
    assert load_handler("worker.handlers:summarise") is summarise
    with pytest.raises(ValueError):
        load_handler("worker.handlers")
    with pytest.raises(ValueError):
        load_handler("worker.handlers:HUNDRED")


def test_one_turn_processes_a_message_and_records_its_summary(broker) -> None:
    formula = broker.submit(SPEC_EXAMPLE).formula
    assert consumer(broker).run_once() == 1
    done = broker.get_formula(formula.id)
    assert done.status == "processed"
    assert done.summary == summarise(formula)
    stats = broker.stats()
    assert (stats.acked, stats.depth, stats.in_flight) == (1, 0, 0)


def test_a_failing_handler_nacks_with_a_backoff_delay(broker, clock, wall_clock) -> None:
    formula = broker.submit(SPEC_EXAMPLE).formula

    def broken(view: FormulaView) -> dict[str, Any]:
        raise RuntimeError("boom")

    worker = consumer(broker, broken, backoff=Backoff(base=10, cap=10))
    worker.run_once()
    info = broker.message_info(formula.message_id)
    assert info.state == "delayed"
    # The broker reports when, on the wall clock, the message comes back.
    assert info.visible_at is not None
    assert wall_clock.now < info.visible_at <= wall_clock.now + 10
    clock.advance(10)
    assert broker.message_info(formula.message_id).state == "ready"


def test_backoff_grows_exponentially_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base=1, cap=8)
    rng = random.Random(1)
    ceilings = [1, 2, 4, 8, 8, 8]
    for attempt, ceiling in enumerate(ceilings, start=1):
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
        assert len(set(delays)) > 100


def test_a_handler_that_always_fails_ends_dead_and_its_formula_failed(broker, clock) -> None:
    formula = broker.submit(SPEC_EXAMPLE).formula

    def broken(view: FormulaView) -> dict[str, Any]:
        raise RuntimeError("boom")

    worker = consumer(broker, broken, backoff=Backoff(base=1, cap=1))
    for _ in range(3):  # max_deliveries is 3 in the fixture
        clock.advance(1)
        assert worker.run_once() == 1
    assert broker.get_formula(formula.id).status == "failed"
    assert [d.message_id for d in broker.dead_letters()] == [formula.message_id]


def test_the_heartbeat_renews_leases_held_past_a_third_of_their_time(broker, clock) -> None:
    formula = broker.submit(SPEC_EXAMPLE).formula
    worker = consumer(broker, visibility_timeout=30)
    [delivery] = broker.receive("test", 1, 30)
    worker.held.add(delivery.receipt, clock.now)
    beat = Heartbeat(worker, clock=clock)
    assert beat.beat() == 0
    clock.advance(11)
    assert beat.beat() == 1
    clock.advance(25)  # 36 s after receipt: alive only thanks to the renewal
    assert broker.message_info(formula.message_id).state == "in_flight"
    assert broker.complete(delivery.receipt, {})


def test_stopping_releases_the_rest_of_the_batch_at_once(broker) -> None:
    ids = [
        broker.submit(
            parse_formula(
                f'{{"name": "f", "materials": [{{"name": "m{i}", "concentration": 1}}]}}'.encode()
            )
        ).formula.id
        for i in range(3)
    ]
    worker = consumer(broker, batch_size=3)

    def stop_after_first(view: FormulaView) -> dict[str, Any]:
        worker.stop()
        return summarise(view)

    worker.handler = stop_after_first
    assert worker.run_once() == 1
    statuses = [broker.get_formula(i).status for i in ids]
    assert statuses == ["processed", "queued", "queued"]
    stats = broker.stats()
    assert (stats.in_flight, stats.depth) == (0, 2)
    assert worker.run_once() == 0  # stopped: receives nothing more
