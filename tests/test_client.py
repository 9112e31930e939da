"""BrokerClient against a real broker process: connect lazily, fail cleanly, recover."""

from __future__ import annotations

import pytest

from broker.client import BrokerClient
from broker.errors import BrokerUnavailable
from broker.formula import parse_formula
from tests.support import broker_process, environment, wait_for_broker

pytestmark = pytest.mark.processes

ROSE = parse_formula(b'{"name": "Rose", "materials": [{"name": "Rose", "concentration": 5}]}')


def test_a_client_made_before_the_broker_exists_connects_on_first_use() -> None:
    with environment() as env:
        client = BrokerClient(env.settings())
        with pytest.raises(BrokerUnavailable):
            client.ping()
        broker = broker_process(env).start()
        try:
            wait_for_broker(env, broker)
            assert client.ping()
        finally:
            broker.stop()


def test_the_same_thread_recovers_at_once_after_a_broker_restart() -> None:
    with environment() as env:
        broker = broker_process(env).start()
        try:
            wait_for_broker(env, broker)
            client = BrokerClient(env.settings())
            assert client.ping()
            broker.kill()
            with pytest.raises(BrokerUnavailable):
                client.stats()
            broker = broker_process(env).start()
            wait_for_broker(env, broker)
            # No failed call in between: the dead connection must not be reused.
            assert client.submit(ROSE).formula.name == "Rose"
            broker.kill()
            broker = broker_process(env).start()
            wait_for_broker(env, broker)
            assert client.stats().formulas == 0  # a read after a restart, first try
            assert client.submit(ROSE).formula.name == "Rose"  # a write, first try
        finally:
            broker.stop()
