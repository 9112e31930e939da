from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from _pytest.nodes import Item
from _pytest.runner import CallInfo

from broker.engines.embedded import EmbeddedBroker


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def wall_clock() -> FakeClock:
    return FakeClock(1_795_000_000.0)


@pytest.fixture
def broker(clock: FakeClock, wall_clock: FakeClock) -> Iterator[EmbeddedBroker]:
    ids = (f"id-{n:06d}-padding-xyz" for n in itertools.count(1))
    yield EmbeddedBroker(
        queue_capacity=100,
        visibility_timeout=30.0,
        max_deliveries=3,
        clock=clock,
        wall_clock=wall_clock,
        new_id=lambda: next(ids),
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Item, call: CallInfo[None]) -> object:
    # Lets fixtures that run processes print their logs when the test failed.
    report = yield
    if call.when == "call":
        item.stash[FAILED] = bool(report.failed)  # type: ignore[attr-defined]
    return report


FAILED = pytest.StashKey[bool]()


def call_failed(request: pytest.FixtureRequest) -> bool:
    return request.node.stash.get(FAILED, False)
