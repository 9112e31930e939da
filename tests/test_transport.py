"""The manager transport: exactly the interface's methods, one connection per client thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.managers import RemoteError
from typing import Any

import pytest

from broker.engines import open_engine
from broker.interface import METHODS
from broker.settings import Settings
from broker.transport import BrokerConnection, load_or_create_authkey, make_server
from tests.support import environment


@pytest.fixture
def served() -> Iterator[tuple[Settings, Any]]:
    with environment() as env:
        settings: Settings = env.settings()
        engine = open_engine(settings)
        server = make_server(engine, settings)
        thread = threading.Thread(target=_serve, args=(server,), daemon=True)
        thread.start()
        try:
            yield settings, engine
        finally:
            server.stop_event.set()
            thread.join(5)
            server.listener.close()
            engine.close()


def _serve(server: Any) -> None:
    with contextlib.suppress(SystemExit):
        server.serve_forever()


def connect(settings: Settings) -> BrokerConnection:
    return BrokerConnection(settings.manager_address(), load_or_create_authkey(settings))


def test_only_the_interface_methods_can_be_called(served) -> None:
    settings, _ = served
    connection = connect(settings)
    try:
        assert connection.call("ping", (), {}) is True
        assert "close" not in METHODS
        with pytest.raises(RemoteError, match="close"):
            connection.call("close", (), {})  # the engine has it; the wire does not
        assert connection.call("stats", (), {}).formulas == 0  # and the connection still works
    finally:
        connection.close()


def test_each_connection_is_its_own_and_outlives_another_ones_end(served) -> None:
    settings, _ = served
    first, second = connect(settings), connect(settings)
    first.close()
    assert second.call("ping", (), {}) is True
    with pytest.raises(OSError):
        first.call("ping", (), {})
    second.close()


def test_a_wrong_authkey_is_refused(served) -> None:
    settings, _ = served
    with pytest.raises(AuthenticationError):
        BrokerConnection(settings.manager_address(), b"not the key")
