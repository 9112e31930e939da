"""``python -m broker`` as a process: starts, refuses a twin, stops cleanly."""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.formula import parse_formula
from tests.support import broker_process, environment, free_port, wait_for_broker

pytestmark = pytest.mark.processes

ROSE = parse_formula(b'{"name": "Rose", "materials": [{"name": "Rose", "concentration": 5}]}')


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_broker_cleanly_and_removes_its_sockets(signum) -> None:
    with environment(durable=True) as env:
        broker = broker_process(env).start()
        wait_for_broker(env, broker)
        sockets = [Path(env.broker_address), Path(env.admin_socket)]
        assert all(stat.S_IMODE(s.stat().st_mode) == 0o600 for s in sockets)
        assert stat.S_IMODE((env.directory / "authkey").stat().st_mode) == 0o600
        broker.signal(signum)
        assert broker.wait(30) == 0
        assert not any(s.exists() for s in sockets)
        assert "Traceback" not in broker.output()


def test_a_second_broker_on_the_same_address_is_refused() -> None:
    with environment() as env:
        first = broker_process(env).start()
        try:
            wait_for_broker(env, first)
            second = broker_process(env)
            second.log_path = env.directory / "second.log"
            second.start()
            assert second.wait(30) == 2
            assert "already listening" in second.output()
            assert first.alive()
        finally:
            first.stop()


def test_the_broker_serves_tcp_on_request() -> None:
    with environment() as env:
        env.extra["FORMULARY_BROKER_ADDRESS"] = f"127.0.0.1:{free_port()}"
        broker = broker_process(env).start()
        try:
            wait_for_broker(env, broker)
            client = BrokerClient(env.settings())
            assert client.submit(ROSE).formula.name == "Rose"
            assert client.stats().formulas == 1
        finally:
            assert broker.stop() == 0
