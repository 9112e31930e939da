"""api.connections on its own: the body deadline, and when an answer closes the connection."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.testing
import pytest

from api.app import create_app
from api.connections import BodyTimeout, honour_connection_close, read_within
from broker.settings import Settings

AUTH_OFF = Settings(auth="off")  # tests/test_auth.py builds apps with keys


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def request_reading(server: socket.socket, length: int) -> falcon.Request:
    """A request whose body is read from ``server``, as gunicorn hands a threaded app one."""
    env = falcon.testing.create_environ(
        method="POST", path="/formulas", headers={"Content-Length": str(length)}
    )
    env["wsgi.input"] = server.makefile("rb")
    env["gunicorn.socket"] = server
    return falcon.Request(env)


def test_a_body_that_stops_arriving_is_cut_off_at_the_deadline(pair) -> None:
    server, client = pair
    client.sendall(b'{"na')  # and nothing more
    with pytest.raises(BodyTimeout):
        read_within(request_reading(server, 100), limit=1000, seconds=0.2)
    assert server.gettimeout() is None  # the socket is as it was


def test_a_whole_body_is_read_and_marked_read(pair) -> None:
    server, client = pair
    client.sendall(b'{"name": 1}')
    req = request_reading(server, 11)
    assert read_within(req, limit=1000, seconds=5) == b'{"name": 1}'
    assert req.context.body_read is True


def test_an_answer_that_leaves_the_body_unread_says_close(broker) -> None:
    client = falcon.testing.TestClient(create_app(broker, AUTH_OFF))
    too_large = client.simulate_post(
        "/formulas", body=b" " * 65_537, headers={"Content-Type": "application/json"}
    )
    assert too_large.status_code == 413 and too_large.headers["Connection"] == "close"
    wrong_type = client.simulate_post(
        "/formulas", body=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415 and wrong_type.headers["Connection"] == "close"
    invalid = client.simulate_post(
        "/formulas", body=b'{"name": ""}', headers={"Content-Type": "application/json"}
    )
    assert invalid.status_code == 400 and "Connection" not in invalid.headers
    missing = client.simulate_get("/nowhere")
    assert missing.status_code == 404 and "Connection" not in missing.headers


class ServerResponse:
    """Stands in for gunicorn's response: start_response is its bound method."""

    def __init__(self) -> None:
        self.closed = False
        self.headers: list[tuple[str, str]] = []

    def force_close(self) -> None:
        self.closed = True

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        self.headers = headers


def test_the_server_is_asked_to_close_when_the_answer_says_so() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        closing = environ["PATH_INFO"] == "/close"
        start_response("400 Bad Request", [("Connection", "close")] if closing else [])
        return [b""]

    wrapped = honour_connection_close(app)
    for path, closed in (("/close", True), ("/keep", False)):
        server = ServerResponse()
        wrapped(falcon.testing.create_environ(path=path), server.start_response)
        assert server.closed is closed
