"""What both engines share: cursors, the per-key rate limiter, and the calls they answer alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from broker.engines.shared import (
    MAX_BATCH,
    MAX_WAIT_SECONDS,
    EngineCalls,
    TokenBuckets,
    decode_cursor,
    encode_cursor,
)
from broker.errors import FormulaNotFound, InvalidCursor, InvalidSummary, StaleReceipt
from broker.interface import (
    ALREADY_ACKED,
    COMPLETED,
    INVALID_SUMMARY,
    MAX_PAGE,
    STALE,
    Delivery,
    FormulaPage,
    FormulaView,
    SubmitOutcome,
    SubmitRequest,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_may_burst_its_rate_then_waits_for_the_next_token() -> None:
    clock = Clock()
    buckets = TokenBuckets(5, clock)
    assert [buckets.spend("k") for _ in range(5)] == [0.0] * 5
    assert buckets.spend("k") == pytest.approx(0.2)
    assert buckets.spend("other") == 0.0  # each key has its own bucket
    clock.now += 0.2
    assert buckets.spend("k") == 0.0
    assert buckets.spend("k") == pytest.approx(0.2)


def test_a_refused_request_spends_nothing_and_idle_time_refills_only_to_the_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(2, clock)
    buckets.spend("k"), buckets.spend("k")
    for _ in range(10):
        assert buckets.spend("k") == pytest.approx(0.5)
    clock.now += 60
    assert [buckets.spend("k") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_a_rate_below_one_per_second_still_allows_one_request() -> None:
    clock = Clock()
    buckets = TokenBuckets(0.5, clock)
    assert buckets.spend("k") == 0.0
    assert buckets.spend("k") == pytest.approx(2.0)


def test_full_buckets_are_forgotten_when_there_are_many() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, clock)
    buckets.MAX_IDLE = 3
    for key in "abcd":
        buckets.spend(key)
    clock.now += 5
    buckets.spend("e")  # more than MAX_IDLE: a..d have refilled and go
    assert buckets.spend("a") == 0.0 and buckets.spend("a") == pytest.approx(1.0)


def test_cursors_round_trip_and_anything_else_is_refused() -> None:
    assert decode_cursor(encode_cursor(42)) == 42
    for bad in ("", "nope", encode_cursor(42) + "x", "czA", "x" * 40):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


class Recording(EngineCalls):
    """An engine whose batch calls record what they were asked and answer as told."""

    def __init__(self, complete_outcome: str = COMPLETED) -> None:
        self._buckets = None
        self.asked: list[tuple[Any, ...]] = []
        self.complete_outcome = complete_outcome

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        raise NotImplementedError

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        self.asked.append(("complete_many", list(results)))
        return [self.complete_outcome for _ in results]

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        self.asked.append(("get_formulas", list(formula_ids)))
        return [None for _ in formula_ids]

    def _page(self, limit: int, cursor: str | None) -> FormulaPage:
        self.asked.append(("_page", limit, cursor))
        return FormulaPage((), None)

    def _receive(
        self, consumer: str, max_messages: int, visibility_timeout: float | None, wait: float
    ) -> list[Delivery]:
        self.asked.append(("_receive", consumer, max_messages, visibility_timeout, wait))
        return []


def test_receive_bounds_its_batch_and_its_wait_before_the_engine_sees_them() -> None:
    engine = Recording()
    engine.receive("w", 10_000, None, 3_600)
    engine.receive("w", 0, 5.0, -1)
    engine.receive("w")
    assert [call[2:] for call in engine.asked] == [
        (MAX_BATCH, None, MAX_WAIT_SECONDS),
        (1, 5.0, 0.0),
        (1, None, 0.0),
    ]


def test_a_page_limit_out_of_range_never_reaches_the_engine() -> None:
    engine = Recording()
    for limit in (0, MAX_PAGE + 1):
        with pytest.raises(ValueError, match="limit"):
            engine.list_formulas(limit)
    engine.list_formulas(MAX_PAGE, "c")
    assert engine.asked == [("_page", MAX_PAGE, "c")]


def test_the_single_calls_are_the_batch_calls_for_one_item() -> None:
    with pytest.raises(FormulaNotFound):
        Recording().get_formula("f")
    assert Recording(COMPLETED).complete("r", {}) is True
    assert Recording(ALREADY_ACKED).complete("r", {}) is False
    with pytest.raises(StaleReceipt):
        Recording(STALE).complete("r", {})
    with pytest.raises(InvalidSummary):
        Recording(INVALID_SUMMARY).complete("r", {})
    assert Recording().rate_limit("k") == 0.0  # no limit set
