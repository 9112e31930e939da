"""Durability with the real processes: SIGKILL the broker under load, start it
again on the same journal, and check that every promise made still holds."""

from __future__ import annotations

import stat
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import call_failed
from tests.support import (
    Stack,
    broker_process,
    environment,
    running_stack,
    wait_for,
    wait_for_broker,
)

pytestmark = pytest.mark.processes


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 3.25}]}


@pytest.fixture
def durable_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(durable=True, FORMULARY_VISIBILITY_TIMEOUT="3") as stack:
        yield stack
        if call_failed(request):
            print(stack.logs(), file=sys.stderr)


class Load:
    """Client threads posting distinct formulas until told to stop."""

    def __init__(self, stack: Stack, threads: int = 4, per_thread: int = 150) -> None:
        self.stack = stack
        self.accepted: dict[str, dict[str, Any]] = {}  # id -> body
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._post, args=(t, per_thread)) for t in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _post(self, thread: int, count: int) -> None:
        # Bounded: at most `count` accepted and 20 * `count` attempts per thread.
        accepted = 0
        for n in range(20 * count):
            if self.stop.is_set() or accepted >= count:
                return
            body = formula(f"load-{thread}-{n}")
            response = self.stack.http.post_json("/formulas", body)
            with self._lock:
                self.statuses.append(response.status)
                if response.status == 202:
                    self.accepted[response.json()["id"]] = body
                    accepted += 1

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)


def all_processed(stack: Stack, ids: list[str]) -> dict[str, str]:
    client = stack.client()
    processed_at: dict[str, str] = {}
    for formula_id in ids:
        view = client.get_formula(formula_id)
        if view.status != "processed":
            return {}
        assert view.processed_at is not None
        processed_at[formula_id] = view.processed_at
    return processed_at


def test_a_broker_killed_under_load_loses_nothing_that_got_a_202(durable_stack) -> None:
    stack = durable_stack
    stack.start_worker("--concurrency", "2")
    stack.start_worker("--concurrency", "2")
    with Load(stack) as load:
        wait_for(lambda: load.count() >= 60, timeout=60, what="some accepted formulas")
        stack.broker.kill()
        down = len(load.statuses)
        wait_for(lambda: len(load.statuses) > down + 10, what="requests while the broker is down")
        stack.start_broker()
        settled = load.count()
        wait_for(lambda: load.count() > settled + 60, timeout=60, what="accepting again")
    assert set(load.statuses) <= {202, 503}, set(load.statuses)
    assert 503 in load.statuses
    ids = list(load.accepted)
    first = wait_for(lambda: all_processed(stack, ids), timeout=90, what="all processed")
    # Each accepted make-up is still known: posting it again is a 409.
    with ThreadPoolExecutor(8) as pool:
        again = list(
            pool.map(lambda b: stack.http.post_json("/formulas", b).status, load.accepted.values())
        )
    assert again == [409] * len(ids)
    # Processing happened once: processed_at never moves, even after another restart.
    stack.broker.kill()
    stack.start_broker()
    assert all_processed(stack, ids) == first
    stats = stack.client().stats()
    assert (stats.depth, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0)
    # A submit whose answer was lost with the broker may have been stored
    # (the client saw a 503 and would retry to find a 409): never fewer.
    assert stats.formulas >= len(ids)


def test_workers_killed_while_the_broker_restarts_lose_nothing(durable_stack) -> None:
    stack = durable_stack
    ids = [
        stack.http.post_json("/formulas", formula(f"restart-{i}")).json()["id"] for i in range(40)
    ]
    stack.broker.kill()
    workers = [stack.start_worker(), stack.start_worker()]
    stack.start_broker()
    for worker in workers:
        worker.kill()
    stack.start_worker("--concurrency", "2")
    wait_for(lambda: all_processed(stack, ids), timeout=60, what="all processed")


def test_an_idempotency_key_replays_the_same_bytes_after_a_broker_crash(durable_stack) -> None:
    stack = durable_stack
    body = formula("keyed")
    first = stack.http.post_json("/formulas", body, Idempotency_Key="crash-1")
    assert first.status == 202
    stack.broker.kill()
    stack.start_broker()
    wait_for(lambda: stack.http.get("/health").status == 200, what="the API to reconnect")
    again = stack.http.post_json("/formulas", body, Idempotency_Key="crash-1")
    assert again.status == 202
    assert again.body == first.body
    assert again.header("Idempotent-Replayed") == "true"
    assert stack.client().stats().formulas == 1


def test_a_corrupt_journal_stops_the_broker_with_a_clear_message_and_keeps_the_file() -> None:
    with environment(durable=True) as env:
        garbage = b"this is not an SQLite file, but it is somebody's data\n" * 100
        env.journal.write_bytes(garbage)
        broker = broker_process(env).start()
        assert broker.wait(30) == 3
        assert str(env.journal) in broker.output()
        assert env.journal.read_bytes() == garbage


def test_a_missing_journal_directory_is_created_owner_only() -> None:
    with environment(durable=True) as env:
        nested = env.directory / "new" / "dir" / "journal.sqlite3"
        env.extra["FORMULARY_DATA"] = str(nested)
        broker = broker_process(env).start()
        try:
            wait_for_broker(env, broker)
            assert stat.S_IMODE(nested.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(nested.stat().st_mode) == 0o600
        finally:
            assert broker.stop() == 0
