"""The PostgreSQL engine's multi-host promises, with the real processes.

Two "hosts" on one machine: two whole stacks (broker, gunicorn API, workers), each
with its own sockets and port, both with ``FORMULARY_DATA`` naming one fresh
database. What a user sees over HTTP is checked against what is stored, read
through either host's broker or straight from the database.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from broker.errors import StaleReceipt
from tests.conftest import call_failed
from tests.support import (
    Process,
    Response,
    Stack,
    admin_cli,
    broker_process,
    environment,
    free_port,
    wait_for,
    wait_for_api,
    wait_for_broker,
)

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

pytestmark = pytest.mark.processes

LEASE_SECONDS = 2
"""Every host's FORMULARY_VISIBILITY_TIMEOUT: leases run out quickly."""


def formula(tag: str, concentration: float = 4.5) -> dict[str, object]:
    return {
        "name": tag,
        "materials": [{"name": f"Material {tag}", "concentration": concentration}],
    }


@contextmanager
def two_hosts(dsn: str, **extra: str) -> Iterator[tuple[Stack, Stack]]:
    """Brokers and APIs of hosts A and B on one database, started side by side."""
    with (
        environment(False, FORMULARY_DATA=dsn, **extra) as env_a,
        environment(False, FORMULARY_DATA=dsn, **extra) as env_b,
    ):
        while env_b.port == env_a.port:
            env_b.port = free_port()
        hosts = (Stack(env_a), Stack(env_b))
        try:
            try:
                # All four at once: an API answers 503 until its broker is up.
                for host in hosts:
                    host.broker = broker_process(host.env).start()
                    host.api.start()
                for host in hosts:
                    wait_for_broker(host.env, host.broker)
                # One API key for both hosts (keys live in the database): a client's
                # Idempotency-Keys are then the same keys whichever host it asks.
                hosts[0].ensure_key()
                hosts[1].http.token = hosts[0].http.token
                for host in hosts:
                    wait_for_api(host.http, host.api)
            except BaseException:
                print_logs(hosts)
                raise
            yield hosts
        finally:
            # As Stack.stop does, workers first and brokers last; the hosts side by side.
            stop_together([w for host in hosts for w in host.workers])
            stop_together([host.api for host in hosts])
            stop_together([host.broker for host in hosts])


def stop_together(processes: list[Process]) -> None:
    running = [p for p in processes if p.alive()]
    for process in running:
        process.signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def print_logs(hosts: tuple[Stack, Stack]) -> None:
    for name, host in zip("AB", hosts, strict=True):
        print(f"===== host {name}\n{host.logs()}", file=sys.stderr)


@pytest.fixture
def hosts(request: pytest.FixtureRequest, postgres_dsn: str) -> Iterator[tuple[Stack, Stack]]:
    with two_hosts(postgres_dsn, FORMULARY_VISIBILITY_TIMEOUT=str(LEASE_SECONDS)) as both:
        yield both
        if call_failed(request):
            print_logs(both)


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, connect_timeout=10) as connection:
        return connection.execute(sql).fetchall()


def stored(dsn: str) -> dict[str, Any]:
    """What the database holds: formulas, messages, keys, and anything half-written."""
    [(formulas, messages, keys, orphans, unpublished)] = query(
        dsn,
        """
        SELECT (SELECT count(*) FROM formulary.formulas),
               (SELECT count(*) FROM formulary.messages),
               (SELECT count(*) FROM formulary.idempotency_keys),
               (SELECT count(*) FROM formulary.messages m
                 WHERE NOT EXISTS (SELECT 1 FROM formulary.formulas f WHERE f.id = m.formula_id)),
               (SELECT count(*) FROM formulary.formulas f
                 WHERE f.processed_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM formulary.messages m WHERE m.id = f.message_id))
        """,
    )
    return {
        "formulas": formulas,
        "messages": messages,
        "keys": keys,
        "orphan_messages": orphans,
        "formulas_without_message": unpublished,
    }


def post(host: Stack, body: dict[str, object], **headers: str) -> Response | None:
    """A POST to the host's API; None when the connection itself failed."""
    try:
        return host.http.post_json("/formulas", body, **headers)
    except (OSError, http.client.HTTPException):
        return None


def processed(host: Stack, formula_id: str) -> dict[str, Any]:
    """The formula as the host's API shows it once it is processed; until then, {}."""
    response = host.http.get(f"/formulas/{formula_id}")
    view: dict[str, Any] = response.json()
    return view if response.status == 200 and view["status"] == "processed" else {}


def healthy(host: Stack) -> bool:
    return host.http.get("/health").status == 200


def unavailable(response: Response) -> bool:
    return response.status == 503 and bool(response.header("Retry-After"))


# -- one make-up, stored once, whichever host --------------------------------------


def test_identical_submits_racing_on_two_hosts_store_one_formula_and_one_message(
    hosts: tuple[Stack, Stack], postgres_dsn: str
) -> None:
    a, b = hosts
    body = formula("Racing", 7.25)
    barrier = threading.Barrier(16)

    def submit(n: int) -> Response:
        barrier.wait(30)
        return (a if n % 2 else b).http.post_json("/formulas", body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(submit, range(16)))

    statuses = sorted(r.status for r in responses)
    assert statuses == [202] + [409] * 15, statuses
    [accepted] = [r.json() for r in responses if r.status == 202]
    duplicates = [r.json() for r in responses if r.status == 409]
    assert {d["existing_id"] for d in duplicates} == {accepted["id"]}
    assert {d["fingerprint"] for d in duplicates} == {accepted["fingerprint"]}
    assert {r.header("Location") for r in responses} == {f"/formulas/{accepted['id']}"}
    # Both hosts answered (half the clients each), and both see the one formula.
    for host in hosts:
        shown = host.http.get(f"/formulas/{accepted['id']}")
        assert shown.status == 200 and shown.json()["message_id"] == accepted["message_id"]

    # Gauges are the whole system's, whichever broker is asked; totals are each broker's.
    stats = [host.client().stats() for host in hosts]
    for s in stats:
        assert (s.formulas, s.depth, s.in_flight, s.dead) == (1, 1, 0, 0)
    assert sum(s.published for s in stats) == sum(s.submitted for s in stats) == 1
    assert sum(s.duplicates for s in stats) == 15
    operator_view = admin_cli(a, "stats")
    assert (operator_view["formulas"], operator_view["depth"]) == (1, 1)
    assert stored(postgres_dsn) == {
        "formulas": 1,
        "messages": 1,
        "keys": 0,
        "orphan_messages": 0,
        "formulas_without_message": 0,
    }


# -- a formula submitted on one host, processed on another -------------------------


def test_a_formula_submitted_on_host_a_is_processed_by_a_long_polling_worker_on_host_b(
    hosts: tuple[Stack, Stack],
) -> None:
    a, b = hosts
    # One long poll of 30 s: a receive that is not woken by the submit's notice
    # looks again only after the engine's 1 s re-check, never sooner.
    b.start_worker("--wait", "30", "--batch", "1", "--grace", "1")
    rounds = 6
    latencies: list[float] = []
    for n in range(rounds + 1):  # the first one waits for the worker to start: not timed
        started = time.monotonic()
        created = a.http.post_json("/formulas", formula(f"woken-{n}"))
        assert created.status == 202, created.body
        formula_id = created.json()["id"]
        # Each submit comes right after the worker went back to its long poll: were
        # it not woken, it would see the formula only at its next re-check, ~1 s on.
        view = wait_for(
            partial(processed, b, formula_id),
            timeout=30,
            interval=0.005,
            what=f"formula {n} to be processed on host B",
        )
        if n:
            latencies.append(time.monotonic() - started)
        assert view["deliveries"] == 1
        assert view["summary"]["material_count"] == 1

    assert max(latencies) < 2.0, latencies
    assert sum(latencies) / rounds < 0.5, latencies
    # Host B's broker handed them out and recorded the results; host A's did neither.
    stats_a, stats_b = a.client().stats(), b.client().stats()
    assert (stats_b.delivered, stats_b.processed) == (rounds + 1, rounds + 1)
    assert (stats_a.delivered, stats_a.processed) == (0, 0)
    assert (stats_a.formulas, stats_a.depth, stats_a.in_flight) == (rounds + 1, 0, 0)


# -- a broker killed mid-submit --------------------------------------------------


class KeyedClients:
    """Client threads posting to one host, each body with its own Idempotency-Key.

    A client retries a body with its key on a 503 or a failed connection until it
    gets an answer (202 or 409), as the SPEC tells clients to. Every third make-up
    is posted by every client (under each one's own key): one of them is stored.
    """

    def __init__(self, host: Stack, clients: int = 4, per_client: int = 40) -> None:
        self.host = host
        self.bodies = {
            f"k-{c}-{n}": formula(f"shared-{n}" if n % 3 == 0 else f"client-{c}-{n}")
            for c in range(clients)
            for n in range(per_client)
        }
        self.answers: dict[str, Response] = {}  # key -> the answer finally given
        self.attempts: list[int | None] = []  # every status; None: no HTTP answer
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(c, per_client)) for c in range(clients)
        ]

    def __enter__(self) -> KeyedClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self._threads:
            thread.join(90)

    def _run(self, client: int, count: int) -> None:
        deadline = time.monotonic() + 60
        for n in range(count):
            key = f"k-{client}-{n}"
            while True:
                response = post(self.host, self.bodies[key], Idempotency_Key=key)
                with self._lock:
                    self.attempts.append(None if response is None else response.status)
                    if response is not None and response.status in (202, 409):
                        self.answers[key] = response
                        break
                    if response is not None and not unavailable(response):
                        self.failures.append(f"{key}: {response.status} {response.body!r}")
                        return
                if time.monotonic() > deadline:
                    with self._lock:
                        self.failures.append(f"{key}: no answer within 60 s")
                    return
                time.sleep(0.02)  # a client's pause before it retries

    def answered(self) -> int:
        with self._lock:
            return len(self.answers)

    def outages(self) -> int:
        with self._lock:
            return sum(status is None or status == 503 for status in self.attempts)


def waiting_on_locks(dsn: str) -> int:
    """Brokers' database sessions waiting on a lock (that is, in mid-transaction)."""
    [(count,)] = query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'formulary-broker' AND wait_event_type = 'Lock'",
    )
    return int(count)


def answered_id(response: Response) -> str:
    data = response.json()
    return str(data["id"] if response.status == 202 else data["existing_id"])


def test_a_broker_killed_mid_submit_leaves_nothing_half_written_and_keys_get_one_answer(
    hosts: tuple[Stack, Stack], postgres_dsn: str
) -> None:
    a, b = hosts
    with KeyedClients(a) as clients:
        wait_for(lambda: clients.answered() >= 20, timeout=30, what="some answers from host A")
        # Mid-submit for certain: submits of host A held inside their transactions (on
        # the counters' lock) when its broker is killed. Released, they roll back.
        with psycopg.connect(postgres_dsn) as blocker:
            blocker.execute("LOCK TABLE formulary.counters IN EXCLUSIVE MODE")
            wait_for(lambda: waiting_on_locks(postgres_dsn) > 0, what="submits under way on A")
            a.broker.kill()
            killed_at = clients.answered()
            blocker.rollback()
        # Nothing the killed broker had under way is half-written, even before it is back.
        during = stored(postgres_dsn)
        assert during["orphan_messages"] == during["formulas_without_message"] == 0, during
        wait_for(lambda: clients.outages() >= 8, what="clients to meet the broker's absence")
        a.start_broker()
    assert clients.failures == [], clients.failures
    assert killed_at < len(clients.bodies), "the clients finished before the kill"
    assert set(clients.answers) == set(clients.bodies)
    assert set(clients.attempts) <= {202, 409, 503, None}, set(clients.attempts)

    # Each make-up is stored once: one key has its 202, every other key its 409.
    ids_by_makeup: dict[str, set[str]] = {}
    accepted_by_makeup: dict[str, list[str]] = {}
    for key, response in clients.answers.items():
        makeup = str(clients.bodies[key]["name"])
        ids_by_makeup.setdefault(makeup, set()).add(answered_id(response))
        if response.status == 202:
            accepted_by_makeup.setdefault(makeup, []).append(key)
    assert all(len(ids) == 1 for ids in ids_by_makeup.values()), ids_by_makeup
    assert {m: len(keys) for m, keys in accepted_by_makeup.items()} == dict.fromkeys(
        ids_by_makeup, 1
    )
    answered_ids = {answered_id(r) for r in clients.answers.values()}

    # What is stored: exactly those formulas, each with its message; every key names
    # the formula its answer named, and remembers whether that answer was a 409.
    assert stored(postgres_dsn) == {
        "formulas": len(ids_by_makeup),
        "messages": len(ids_by_makeup),
        "keys": len(clients.bodies),
        "orphan_messages": 0,
        "formulas_without_message": 0,
    }
    assert {row[0] for row in query(postgres_dsn, "SELECT id FROM formulary.formulas")} == (
        answered_ids
    )
    keys = {
        key: (formula_id, duplicate)
        for key, formula_id, duplicate in query(
            postgres_dsn, "SELECT key, formula_id, duplicate FROM formulary.idempotency_keys"
        )
    }
    assert keys == {key: (answered_id(r), r.status == 409) for key, r in clients.answers.items()}
    stats_b = b.client().stats()
    assert (stats_b.formulas, stats_b.depth) == (len(ids_by_makeup), len(ids_by_makeup))

    # The answers are global: every key retried on host B replays the one answer.
    def replay(key: str) -> tuple[str, Response]:
        return key, b.http.post_json("/formulas", clients.bodies[key], Idempotency_Key=key)

    with ThreadPoolExecutor(8) as pool:
        replays = dict(pool.map(replay, clients.bodies))
    for key, again in replays.items():
        first = clients.answers[key]
        assert again.status == first.status, (key, again.status, again.body)
        assert again.header("Idempotent-Replayed") == "true", key
        assert again.header("Location") == first.header("Location"), key
        assert again.json() == first.json(), key
    assert stored(postgres_dsn)["formulas"] == len(ids_by_makeup)


# -- a host's broker gone: the other host carries on ------------------------------


def test_with_one_hosts_broker_gone_the_other_host_serves_and_the_first_recovers_by_itself(
    hosts: tuple[Stack, Stack], postgres_dsn: str
) -> None:
    a, b = hosts
    before = a.http.post_json("/formulas", formula("before"))
    assert before.status == 202
    before_id = before.json()["id"]
    a.broker.kill()

    # Host B carries on: it stores, and it reads what host A stored.
    during = b.http.post_json("/formulas", formula("during"))
    assert during.status == 202, during.body
    during_id = during.json()["id"]
    for formula_id in (before_id, during_id):
        assert b.http.get(f"/formulas/{formula_id}").status == 200
    assert b.http.get("/health").status == 200

    # Host A's API stays up and says so: 503 with Retry-After, and stores nothing.
    refused_body = formula("refused on A")
    for response in (
        a.http.post_json("/formulas", refused_body),
        a.http.get("/health"),
        a.http.get(f"/formulas/{before_id}"),
    ):
        assert unavailable(response), (response.status, response.headers, response.body)
        assert response.json()["status"] == 503
    assert a.api.alive()
    assert b.http.post_json("/formulas", refused_body).status == 202  # A stored nothing

    # Its broker back, host A recovers by itself and sees what B stored meanwhile.
    a.start_broker()
    wait_for(lambda: healthy(a), what="host A's API to recover")
    assert a.http.get(f"/formulas/{during_id}").json()["name"] == "during"
    assert a.http.post_json("/formulas", refused_body).status == 409
    assert a.http.post_json("/formulas", formula("after")).status == 202
    assert stored(postgres_dsn)["formulas"] == 4


# -- the database stopped and started again --------------------------------------


def test_with_the_database_down_both_apis_answer_503_and_recover_losing_nothing(
    hosts: tuple[Stack, Stack], postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    a, b = hosts
    accepted: dict[str, dict[str, Any]] = {}
    for n in range(10):
        response = hosts[n % 2].http.post_json("/formulas", formula(f"kept-{n}"))
        assert response.status == 202
        accepted[response.json()["id"]] = response.json()
    client_a, client_b = a.client(), b.client()
    # A lease held across the restart: taken through host A's broker, never acked.
    [held] = client_a.receive("held-across-restart", 1, LEASE_SECONDS, 0)
    assert held.delivery == 1
    assert client_b.message_info(held.message_id).state == "in_flight"

    port, dsn = postgres_server.port, postgres_dsn
    postgres_server.stop_immediate()
    try:
        requests = [
            (host, method, path)
            for host in hosts
            for method, path in (("POST", "/formulas"), ("GET", "/health"))
        ] + [(a, "GET", f"/formulas/{held.formula_id}")]

        def ask(request: tuple[Stack, str, str]) -> Response:
            host, method, path = request
            if method == "POST":
                return host.http.post_json(path, formula("while the database is down"))
            return host.http.get(path)

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(ask, requests))
        for (host, method, path), response in zip(requests, answers, strict=True):
            assert unavailable(response), (host.env.port, method, path, response.status)
    finally:
        if not postgres_server.running():
            postgres_server.start()
    assert postgres_server.port == port  # the same address: the brokers' DSN still holds
    assert query(dsn, "SELECT 1") == [(1,)]

    for name, host in zip("AB", hosts, strict=True):
        wait_for(partial(healthy, host), timeout=30, what=f"host {name}'s API to recover")
    for n, host in enumerate(hosts):
        assert host.http.post_json("/formulas", formula(f"after-{n}")).status == 202
    # Nothing that got a 202 before is lost, whichever host is asked.
    for formula_id, first in accepted.items():
        for host in hosts:
            shown = host.http.get(f"/formulas/{formula_id}")
            assert shown.status == 200
            view = shown.json()
            assert (view["name"], view["materials"], view["created_at"]) == (
                first["name"],
                first["materials"],
                first["created_at"],
            )
    assert stored(postgres_dsn)["formulas"] == len(accepted) + 2

    # The lease runs out by the database's clock, and the message comes back to another
    # host's consumer ahead of the fresh ones (nine are waiting), its count raised.
    wait_for(
        lambda: client_b.message_info(held.message_id).state == "ready",
        timeout=LEASE_SECONDS + 10,
        what="the held lease to run out",
    )
    [again] = client_b.receive("after-restart", 1, 60, 0)
    assert (again.message_id, again.delivery) == (held.message_id, 2)
    with pytest.raises(StaleReceipt):
        client_a.ack(held.receipt)  # the first lease is over, whichever broker is asked
    assert client_b.ack(again.receipt) is True
    assert b.http.get(f"/formulas/{held.formula_id}").json()["deliveries"] == 2


# -- a worker killed mid-handler on one host -------------------------------------


def test_a_worker_killed_mid_handler_on_host_a_has_its_message_redelivered_to_host_b(
    hosts: tuple[Stack, Stack],
) -> None:
    a, b = hosts
    gate = a.env.directory / "gate"
    gate.mkdir()
    doomed = a.start_worker(FORMULARY_HANDLER="tests.handlers:gated", FORMULARY_TEST_GATE=str(gate))
    created = a.http.post_json("/formulas", formula("killed mid-handler")).json()
    wait_for(lambda: (gate / f"started-{created['id']}").exists(), what="the handler to start")
    doomed.kill()
    killed_at = time.monotonic()
    b.start_worker()  # the default handler

    view = wait_for(
        lambda: processed(a, created["id"]),
        timeout=30,
        what="host B's worker to process it after the lease",
    )
    assert time.monotonic() - killed_at < LEASE_SECONDS + 10
    assert view["deliveries"] == 2
    assert view["summary"]["material_count"] == 1
    stats_a, stats_b = a.client().stats(), b.client().stats()
    assert (stats_a.delivered, stats_a.processed) == (1, 0)
    assert (stats_b.delivered, stats_b.redelivered, stats_b.processed) == (1, 1, 1)
    shown = admin_cli(a, "show", created["id"])
    assert shown["formula"]["status"] == "processed" and shown["message"] is None
