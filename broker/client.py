"""Talking to the broker process from another process.

``BrokerClient`` satisfies ``SubmissionBroker`` and ``ConsumerBroker``. It
connects lazily, on the first call, so a client made before ``os.fork`` (as
gunicorn forks) is never shared: each process makes its own connection. When
the broker goes away it raises ``BrokerUnavailable`` and connects afresh on the
next call, so callers recover by themselves once the broker is back.

Retries. A call whose request may have reached the broker is retried only
when repeating it is harmless (reads). A write (``submit``, ``complete``,
``ack``...) is retried only when the request cannot have been sent: the
connection was refused, or the socket was already closed when we wrote to it.
Otherwise the caller gets ``BrokerUnavailable`` and decides (the API answers
503; an ``Idempotency-Key`` makes the client's retry safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import AuthenticationError
from typing import Any, TypeVar

from broker.errors import BrokerUnavailable, FormularyError
from broker.formula import FormulaDraft
from broker.group import GroupCommit
from broker.interface import (
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    IdempotencyKey,
    MessageInfo,
    Submission,
)
from broker.manager import AuthkeyError, BrokerManager, BrokerProxy, read_authkey
from broker.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Raised while connecting, or when writing to a socket the broker closed:
# the request was not delivered.
_NOT_SENT = (ConnectionRefusedError, FileNotFoundError, BrokenPipeError)
# Anything else that says the connection is gone.
_CONNECTION_LOST = (OSError, EOFError)


class BrokerClient:
    """A broker in another process, reached over the manager protocol."""

    def __init__(self, settings: Settings, *, connect_timeout: float = 5.0) -> None:
        self._settings = settings
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._pid = os.getpid()
        self._submits = GroupCommit(self.submit_many)

    # -- SubmissionBroker ------------------------------------------------------

    def ping(self) -> bool:
        return self._call(lambda b: b.ping(), idempotent=True)

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        # The submits this process's threads make while one round trip is
        # under way wait for it to end and go together in the next one
        # (``submit_many``): fewer round trips and larger journal groups for
        # the broker, each submit still its own atomic step and answer.
        self._after_fork()
        return self._submits((draft, idempotency))

    def submit_many(
        self, requests: Sequence[tuple[FormulaDraft, IdempotencyKey | None]]
    ) -> list[Submission | FormularyError]:
        """One round trip for several submits; see ``Broker.submit_many``."""
        return self._call(lambda b: b.submit_many(requests), idempotent=False)

    def get_formula(self, formula_id: str) -> FormulaView:
        return self._call(lambda b: b.get_formula(formula_id), idempotent=True)

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        return self._call(lambda b: b.get_formulas(formula_ids), idempotent=True)

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        return self._call(lambda b: b.list_formulas(limit, cursor), idempotent=True)

    def stats(self) -> BrokerStats:
        return self._call(lambda b: b.stats(), idempotent=True)

    # -- ConsumerBroker --------------------------------------------------------

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        return self._call(
            lambda b: b.receive(consumer, max_messages, visibility_timeout, wait_seconds),
            idempotent=False,
        )

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        return self._call(lambda b: b.complete(receipt, summary), idempotent=False)

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        return self._call(lambda b: b.complete_many(results), idempotent=False)

    def ack(self, receipt: str) -> bool:
        return self._call(lambda b: b.ack(receipt), idempotent=False)

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        self._call(lambda b: b.nack(receipt, delay), idempotent=False)

    def extend(self, receipt: str, seconds: float) -> float:
        return self._call(lambda b: b.extend(receipt, seconds), idempotent=False)

    # -- operators -------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        return self._call(lambda b: b.dead_letters(limit), idempotent=True)

    def redrive(self, message_id: str) -> None:
        self._call(lambda b: b.redrive(message_id), idempotent=False)

    def redrive_all(self) -> int:
        return self._call(lambda b: b.redrive_all(), idempotent=False)

    def message_info(self, message_id: str) -> MessageInfo:
        return self._call(lambda b: b.message_info(message_id), idempotent=True)

    # -- connection ------------------------------------------------------------

    def close(self) -> None:
        """Forget this thread's connection (the next call makes a new one)."""
        proxy: BrokerProxy | None = getattr(self._local, "proxy", None)
        if proxy is not None:
            _forget_connection(proxy)
        self._local.proxy = None

    def _call(self, method: Callable[[BrokerProxy], T], *, idempotent: bool) -> T:
        for attempt in (1, 2):
            proxy = self._proxy()
            try:
                return method(proxy)
            except _NOT_SENT as exc:
                self._drop(exc)
                if attempt == 2:
                    raise BrokerUnavailable(_describe(exc)) from None
            except _CONNECTION_LOST as exc:
                self._drop(exc)
                if attempt == 2 or not idempotent:
                    raise BrokerUnavailable(_describe(exc)) from None
        raise AssertionError("unreachable")

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            # Forked: the parent's connections, and any group it had under
            # way, belong to the parent.
            self._local = threading.local()
            self._submits = GroupCommit(self.submit_many)
            self._pid = os.getpid()

    def _proxy(self) -> BrokerProxy:
        self._after_fork()
        proxy: BrokerProxy | None = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = self._connect()
            self._local.proxy = proxy
        return proxy

    def _connect(self) -> BrokerProxy:
        try:
            authkey = read_authkey(self._settings)
        except AuthkeyError as exc:
            raise BrokerUnavailable(str(exc)) from None
        manager = BrokerManager(address=self._settings.manager_address(), authkey=authkey)
        try:
            manager.connect()
            proxy: BrokerProxy = manager.broker()  # type: ignore[attr-defined]
            _own_connection(proxy)
        except AuthenticationError:
            raise BrokerUnavailable("the broker refused our authkey") from None
        except (*_NOT_SENT, *_CONNECTION_LOST) as exc:
            raise BrokerUnavailable(_describe(exc)) from None
        log.info("connected to broker at %s", self._settings.broker_address)
        return proxy

    def _drop(self, exc: BaseException) -> None:
        proxy: BrokerProxy | None = getattr(self._local, "proxy", None)
        if proxy is not None:
            log.warning("lost the broker connection (%s); will reconnect", _describe(exc))
            _forget_connection(proxy)
        self._local.proxy = None


def _own_connection(proxy: BrokerProxy) -> None:
    """Give ``proxy`` a connection of its own.

    BaseProxy keeps one connection per thread *per address*, shared by every
    proxy for that address in the process, and keeps it after a call on it
    fails. After a broker restart that shared socket is either dead, or has
    been reconnected by another proxy to the *new* broker, where this proxy's
    object id means nothing. A private slot makes each proxy's connection live
    and die with the proxy.
    """
    proxy._tls = threading.local()  # type: ignore[attr-defined]


def _forget_connection(proxy: BrokerProxy) -> None:
    """Close the proxy's connection (see ``_own_connection``)."""
    connection = getattr(proxy._tls, "connection", None)  # type: ignore[attr-defined]
    if connection is not None:
        with contextlib.suppress(OSError):
            connection.close()
        del proxy._tls.connection  # type: ignore[attr-defined]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
