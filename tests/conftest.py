from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from _pytest.nodes import Item
from _pytest.runner import CallInfo

from broker.engines.embedded import EmbeddedBroker

if TYPE_CHECKING:
    from tests.postgres import PostgresServer


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the session, started by the first test that asks.

    Tests that stop or crash it (``stop_immediate``/``start``) must leave it running.
    """
    from tests.postgres import PostgresServer  # psycopg takes ~0.2 s to import

    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test alone; dropped after, connections and all."""
    dsn = postgres_server.create_database()
    yield dsn
    if not postgres_server.running():
        postgres_server.start()  # a test that failed while the server was stopped
    postgres_server.drop_database(dsn)


def pytest_collection_modifyitems(items: list[Item]) -> None:
    # `-m "not postgres"` leaves out every test that would start the server.
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
    # Slow tests first: under `-n` (pytest-xdist) they start at once, on
    # different processes, instead of one of them running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Item, call: CallInfo[None]) -> object:
    # Lets fixtures that run processes print their logs when the test failed.
    report = yield
    if call.when == "call":
        item.stash[FAILED] = bool(report.failed)  # type: ignore[attr-defined]
    return report


FAILED = pytest.StashKey[bool]()


def call_failed(request: pytest.FixtureRequest) -> bool:
    return bool(request.node.stash.get(FAILED, False))
