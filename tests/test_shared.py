"""What both engines share: cursors and the per-key rate limiter, on an injected clock."""

from __future__ import annotations

import pytest

from broker.engines.shared import TokenBuckets, decode_cursor, encode_cursor
from broker.errors import InvalidCursor


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
