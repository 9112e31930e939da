"""Delivery with the real processes: broker, gunicorn and worker processes."""

from __future__ import annotations

import json
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import Process, Stack, running_stack, wait_for

pytestmark = pytest.mark.processes

FAST_RETRIES = ("--retry-base", "0.05", "--retry-cap", "0.2")


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 2.5}]}


def start_gated_worker(stack: Stack, *args: str) -> tuple[Process, Path]:
    """A worker whose handler (``tests.handlers:gated``) holds each message until ``gate/open``."""
    gate = stack.env.directory / "gate"
    gate.mkdir()
    worker = stack.start_worker(
        *args, FORMULARY_HANDLER="tests.handlers:gated", FORMULARY_TEST_GATE=str(gate)
    )
    return worker, gate


def wait_for_handler(gate: Path, formula_id: str) -> None:
    wait_for(lambda: (gate / f"started-{formula_id}").exists(), what="the handler to start")


def test_200_formulas_posted_concurrently_are_each_processed_exactly_once() -> None:
    with running_stack() as stack:
        stack.start_worker("--concurrency", "2")
        stack.start_worker("--concurrency", "2")
        with ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(lambda i: stack.http.post_json("/formulas", formula(f"f{i}")), range(200))
            )
        assert [r.status for r in responses] == [202] * 200
        ids = [r.json()["id"] for r in responses]
        client = stack.client()
        wait_for(lambda: client.stats().processed == 200, timeout=60, what="200 processed")
        for formula_id in ids:
            view = client.get_formula(formula_id)
            assert view.status == "processed"
            assert view.deliveries == 1
            assert view.summary["material_count"] == 1
        stats = client.stats()
        assert (stats.acked, stats.redelivered, stats.depth, stats.in_flight) == (200, 0, 0, 0)


def test_a_worker_killed_while_holding_a_message_does_not_lose_it() -> None:
    with running_stack(FORMULARY_VISIBILITY_TIMEOUT="2") as stack:
        doomed, gate = start_gated_worker(stack)
        created = stack.http.post_json("/formulas", formula("kill-me")).json()
        wait_for_handler(gate, created["id"])
        doomed.kill()
        stack.start_worker()  # the default handler
        client = stack.client()
        wait_for(
            lambda: client.get_formula(created["id"]).status == "processed",
            what="another worker to process it after the lease",
        )
        view = client.get_formula(created["id"])
        assert view.deliveries == 2
        assert client.stats().processed == 1


def test_a_handler_that_always_fails_dead_letters_and_a_redrive_processes_it() -> None:
    with running_stack(FORMULARY_MAX_DELIVERIES="3") as stack:
        failing = stack.start_worker(*FAST_RETRIES, FORMULARY_HANDLER="tests.handlers:failing")
        created = stack.http.post_json("/formulas", formula("doomed")).json()
        client = stack.client()
        wait_for(lambda: client.get_formula(created["id"]).status == "failed", what="dead letter")
        assert client.get_formula(created["id"]).deliveries == 3
        [dead] = client.dead_letters(10)
        assert dead.message_id == created["message_id"]
        assert failing.stop() == 0
        stack.start_worker()
        client.redrive(created["message_id"])
        wait_for(lambda: client.get_formula(created["id"]).status == "processed", what="redrive")
        assert client.dead_letters(10) == []


def test_sigterm_lets_the_handler_finish_and_ack_then_exits_0() -> None:
    with running_stack() as stack:
        worker, gate = start_gated_worker(stack)
        created = stack.http.post_json("/formulas", formula("graceful")).json()
        wait_for_handler(gate, created["id"])
        worker.signal(signal.SIGTERM)
        (gate / "open").touch()
        assert worker.wait(30) == 0
        client = stack.client()
        view = client.get_formula(created["id"])
        assert view.status == "processed" and view.deliveries == 1
        stats = client.stats()
        assert (stats.acked, stats.redelivered, stats.in_flight, stats.depth) == (1, 0, 0, 0)


def test_a_handler_still_running_past_the_grace_period_is_released_and_the_worker_exits_0() -> None:
    with running_stack() as stack:  # leases of 30 s: only a release brings it back sooner
        stuck, gate = start_gated_worker(stack, "--grace", "1")
        created = stack.http.post_json("/formulas", formula("stuck")).json()
        wait_for_handler(gate, created["id"])
        stuck.signal(signal.SIGTERM)
        assert stuck.wait(30) == 0
        stack.start_worker()
        client = stack.client()
        wait_for(
            lambda: client.get_formula(created["id"]).status == "processed",
            timeout=15,
            what="the released message to be processed well before its lease ran out",
        )
        assert client.get_formula(created["id"]).deliveries == 2


def test_operators_find_and_redrive_dead_letters_over_the_real_brokers_admin_socket() -> None:
    with running_stack(FORMULARY_MAX_DELIVERIES="1") as stack:
        failing = stack.start_worker(*FAST_RETRIES, FORMULARY_HANDLER="tests.handlers:failing")
        created = stack.http.post_json("/formulas", formula("for-operators")).json()
        client = stack.client()
        wait_for(lambda: client.get_formula(created["id"]).status == "failed", what="dead letter")
        assert failing.stop() == 0

        commands = [
            "ping",
            "stats",
            f"show {created['id']}",
            "dead 5",
            "help",
            "bogus",
            "dead zero",
            "redrive nope",
            "redrive all",
        ]
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(30)
            admin.connect(stack.env.admin_socket)
            admin.sendall("".join(f"{c}\n" for c in commands).encode())
            lines = admin.makefile("rb")
            replies = {c: json.loads(lines.readline()) for c in commands}

        assert replies["ping"] == {"ok": True, "pong": True}
        assert replies["stats"]["ok"] and replies["stats"]["dead"] == 1
        shown = replies[f"show {created['id']}"]
        assert shown["formula"]["status"] == "failed" and shown["message"]["state"] == "dead"
        assert [d["message_id"] for d in replies["dead 5"]["dead"]] == [created["message_id"]]
        assert set(replies["help"]["commands"]) >= {"ping", "stats", "show", "dead", "redrive"}
        for bad in ("bogus", "dead zero", "redrive nope"):
            assert replies[bad]["ok"] is False and replies[bad]["error"]
        assert replies["redrive all"] == {"ok": True, "redriven": 1}

        stack.start_worker()
        wait_for(lambda: client.get_formula(created["id"]).status == "processed", what="redrive")
