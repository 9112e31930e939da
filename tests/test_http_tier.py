"""The HTTP tier under clients that are not well behaved, against the real gunicorn.

Stalled clients (partial heads, partial bodies) and idle keep-alive
connections hold nothing other clients need, and a stalled request is cut
off after the read timeout; after any error answer the same connection
either serves the next request or was closed with ``Connection: close``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import SUMMER, Stack, running_stack, wait_for

pytestmark = pytest.mark.processes

READ_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(FORMULARY_READ_TIMEOUT=str(READ_TIMEOUT)) as stack:
        yield stack


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 1}]}


def open_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def partial_head(port: int) -> socket.socket:
    sock = open_socket(port)
    sock.sendall(b"POST /formulas HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    return sock


def partial_body(port: int, auth: dict[str, str]) -> socket.socket:
    sock = open_socket(port)
    key = "".join(f"{name}: {value}\r\n" for name, value in auth.items()).encode()
    sock.sendall(
        b"POST /formulas HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + key
        + b'Content-Length: 100\r\n\r\n{"na'
    )
    return sock


def answer_or_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_64_stalled_clients_leave_others_answered_promptly_and_are_cut_off(stack) -> None:
    port = stack.env.port
    stored_before = stack.client().stats().formulas  # the module's stack: other tests store too
    stalled = [partial_head(port) for _ in range(32)]
    stalled += [partial_body(port, stack.auth_headers) for _ in range(32)]
    stalled_at = time.monotonic()
    try:
        session = requests.Session()
        session.headers.update(stack.auth_headers)
        latencies = []
        for i in range(60):
            started = time.monotonic()
            if i % 2:
                response = session.get(f"http://127.0.0.1:{port}/health", timeout=10)
                assert response.status_code == 200
            else:
                body = formula(f"among-stalled-{i}")
                response = session.post(f"http://127.0.0.1:{port}/formulas", json=body, timeout=10)
                assert response.status_code == 202
            latencies.append(time.monotonic() - started)
        assert max(latencies) < 1.0, (
            f"slowest {max(latencies):.3f}s, median {statistics.median(latencies):.3f}s"
        )

        # Each stalled request is cut off once the read timeout has passed:
        # a partial body with a 408 that closes, a partial head by closing.
        for sock in stalled:
            sock.settimeout(READ_TIMEOUT + 10)
        for sock in stalled[32:]:
            answer = answer_or_close(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"\r\nConnection: close\r\n" in answer
        for sock in stalled[:32]:
            assert answer_or_close(sock) == b""
        elapsed = time.monotonic() - stalled_at
        assert READ_TIMEOUT * 0.9 <= elapsed <= READ_TIMEOUT + 5
    finally:
        for sock in stalled:
            sock.close()
    # Nothing a stalled client sent was stored: only the 30 answered 202.
    assert stack.client().stats().formulas == stored_before + 30


def test_idle_keep_alive_connections_cost_no_thread(stack) -> None:
    port = stack.env.port
    idle = []
    try:
        for _ in range(200):
            sock = open_socket(port)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            idle.append(sock)  # kept open, idle
        started = time.monotonic()
        for _ in range(20):
            response = requests.get(
                f"http://127.0.0.1:{port}/formulas?limit=1", headers=stack.auth_headers, timeout=10
            )
            assert response.status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()


def test_a_stop_closes_idle_keep_alive_connections_instead_of_waiting_them_out() -> None:
    # Keep-alive (60 s) longer than gunicorn's graceful timeout (10 s): a stop
    # that waited for idle connections would take the whole 10 s.
    with running_stack(FORMULARY_READ_TIMEOUT="60") as stack:
        idle = []
        for _ in range(8):
            connection = http.client.HTTPConnection("127.0.0.1", stack.env.port, timeout=30)
            connection.request("GET", "/health")
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read()
            idle.append(connection)
        stopping = time.monotonic()
        assert stack.api.stop() == 0
        assert time.monotonic() - stopping < 5, "the stop waited for idle connections"
        for connection in idle:
            assert connection.sock is not None
            assert answer_or_close(connection.sock) == b""  # closed cleanly, nothing owed
            connection.close()
        assert "graceful timeout" not in stack.api.output().lower()


def test_a_client_sending_requests_back_to_back_does_not_starve_the_others_on_its_worker() -> None:
    # One API worker, so both clients share it. The greedy client pipelines requests that need no
    # broker (404, or 401 first with keys required), so its socket always has the next one
    # waiting: unless the worker gives the other connections a turn between its requests, it
    # serves that client alone (GET /health went unanswered for more than 30 s).
    with running_stack(FORMULARY_WEB_WORKERS="1") as stack:
        port = stack.env.port
        greedy = open_socket(port)
        stop = threading.Event()
        answers = [0]

        def send() -> None:
            burst = b"GET /no-such-path HTTP/1.1\r\nHost: x\r\n\r\n" * 100
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    greedy.sendall(burst)

        def receive() -> None:
            with contextlib.suppress(OSError):
                while chunk := greedy.recv(65536):
                    answers[0] += chunk.count(b"HTTP/1.1 4")

        threads = [threading.Thread(target=send), threading.Thread(target=receive)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: answers[0] >= 1000, timeout=30, what="the greedy client's answers")
            session = requests.Session()
            latencies = []
            for _ in range(20):
                started = time.monotonic()
                try:
                    response = session.get(f"http://127.0.0.1:{port}/health", timeout=5)
                except requests.Timeout:
                    pytest.fail("GET /health got no answer in 5 s beside the greedy client")
                assert response.status_code == 200
                latencies.append(time.monotonic() - started)
            served_meanwhile = answers[0]
            assert max(latencies) < 1.0, latencies
            # ...and the greedy client was still being served, not starved in turn.
            wait_for(lambda: answers[0] > served_meanwhile, timeout=10, what="more answers")
        finally:
            stop.set()
            greedy.shutdown(socket.SHUT_RDWR)
            greedy.close()
            for thread in threads:
                thread.join(timeout=10)


# -- keep-alive after errors ------------------------------------------------------------

SEQUENCES = 1000


def error_requests(stack: Stack) -> dict[int, tuple[str, str, dict[str, str], bytes]]:
    """One request per error status, each answered by that status every time it is sent."""
    stack.http.post_json("/formulas", SUMMER)
    keyed = formula("keyed")
    assert stack.http.post_json("/formulas", keyed, Idempotency_Key="reused").status == 202
    json_type = {"Content-Type": "application/json"}
    return {
        400: ("POST", "/formulas", json_type, b'{"name": "", "materials": []}'),
        404: ("GET", "/nowhere", {}, b""),
        405: ("DELETE", "/formulas", {}, b""),
        413: ("POST", "/formulas", json_type, b" " * 65_537),
        415: ("POST", "/formulas", {"Content-Type": "text/plain"}, b"{}"),
        422: (
            "POST",
            "/formulas",
            {**json_type, "Idempotency-Key": "reused"},
            b'{"name": "other", "materials": [{"name": "Musk", "concentration": 2}]}',
        ),
        409: (
            "POST",
            "/formulas",
            json_type,
            b'{"name": "again", "materials": '
            + (
                b'[{"name": "Bergamot Oil", "concentration": 15.5},'
                b'{"name": "Lavender Absolute", "concentration": 10},'
                b'{"name": "Sandalwood", "concentration": 5.2}]}'
            ),
        ),
    }


@pytest.mark.slow
def test_after_any_error_answer_the_connection_serves_the_next_request_or_was_closed(
    stack,
) -> None:
    port = stack.env.port
    failures: dict[int, list[str]] = {}
    for status, (method, path, headers, body) in error_requests(stack).items():
        session = requests.Session()
        session.headers.update(stack.auth_headers)
        for n in range(SEQUENCES):
            try:
                error = session.request(
                    method, f"http://127.0.0.1:{port}{path}", headers=headers, data=body, timeout=10
                )
                assert error.status_code == status, error.text[:200]
                # Alternate the follow-up: a GET, and a POST (which fared worst).
                if n % 2:
                    after = session.get(f"http://127.0.0.1:{port}/health", timeout=10)
                    assert after.status_code == 200
                else:
                    after = session.post(
                        f"http://127.0.0.1:{port}/formulas",
                        json=formula(f"after-{status}-{n}"),
                        timeout=10,
                    )
                    assert after.status_code == 202, after.text[:200]
            except (requests.ConnectionError, AssertionError) as exc:
                failures.setdefault(status, []).append(repr(exc)[:200])
        session.close()
    assert failures == {}, {status: (len(f), f[:3]) for status, f in failures.items()}


def test_an_error_that_leaves_the_body_unread_says_connection_close(stack) -> None:
    port = stack.env.port
    session = requests.Session()
    session.headers.update(stack.auth_headers)
    too_large = session.post(
        f"http://127.0.0.1:{port}/formulas",
        data=b" " * 65_537,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert too_large.status_code == 413 and too_large.headers["Connection"] == "close"
    invalid = session.post(f"http://127.0.0.1:{port}/formulas", json={"name": ""}, timeout=10)
    # The whole body was read: the connection stays open.
    assert invalid.status_code == 400 and invalid.headers.get("Connection") != "close"


def test_a_503_from_a_full_queue_keeps_the_connection() -> None:
    with running_stack(FORMULARY_QUEUE_CAPACITY="1") as stack:
        port = stack.env.port
        session = requests.Session()
        session.headers.update(stack.auth_headers)
        assert session.post(f"http://127.0.0.1:{port}/formulas", json=SUMMER).status_code == 202
        for n in range(200):
            full = session.post(
                f"http://127.0.0.1:{port}/formulas", json=formula(f"full-{n}"), timeout=10
            )
            assert full.status_code == 503 and "Retry-After" in full.headers
            assert session.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        wait_for(lambda: stack.client().stats().formulas == 1, what="only the first stored")
