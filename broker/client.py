"""Talking to the broker process from another process.

``BrokerClient`` offers every method of ``broker.interface.Broker``: each one
named in ``METHODS`` is made here as a remote call, so the list is never
written out again. It connects lazily, on a thread's first call, so a client
made before ``os.fork`` (as gunicorn forks) is never shared: each process and
each thread makes its own connection. When the broker goes away it raises
``BrokerUnavailable`` and connects afresh on the next call, so callers
recover by themselves once the broker is back.

Retries. A call whose request may have reached the broker is sent again only
when the method is ``read_only``. Any other call is sent again only when the
request cannot have been sent: the connection was refused, or the socket was
already closed when we wrote to it. Otherwise the caller gets
``BrokerUnavailable`` and decides (the API answers 503; an
``Idempotency-Key`` makes the client's retry safe).

Submits share round trips: the submits this process's threads make while one
``submit_many`` is under way wait for it to end and go together in the next
(``broker.group``), each still its own atomic step with its own answer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing import AuthenticationError
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerUnavailable
from broker.formula import FormulaDraft
from broker.group import GroupCommit
from broker.interface import (
    METHODS,
    IdempotencyKey,
    Submission,
    SubmitOutcome,
    SubmitRequest,
)
from broker.settings import Settings
from broker.transport import AuthkeyError, BrokerConnection, read_authkey

log = logging.getLogger(__name__)

# Raised while connecting, or when writing to a socket the broker closed:
# the request was not delivered.
_NOT_SENT = (ConnectionRefusedError, FileNotFoundError, BrokenPipeError)
# Anything else that says the connection is gone.
_CONNECTION_LOST = (OSError, EOFError)


class BrokerClient:
    """A broker in another process, reached over the manager protocol."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._local = threading.local()
        self._pid = os.getpid()
        self._submits: GroupCommit[SubmitRequest, Submission] = GroupCommit(self._submit_group)

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        self._after_fork()
        return self._submits((draft, idempotency))

    def _submit_group(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        outcomes: list[SubmitOutcome] = self.call("submit_many", requests)
        return outcomes

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` on the broker, reconnecting and retrying as the module says."""
        for attempt in (1, 2):
            connection = self._connection()
            try:
                return connection.call(method, args, kwargs)
            except _NOT_SENT as exc:
                self._drop(exc)
                if attempt == 2:
                    raise BrokerUnavailable(_describe(exc)) from None
            except _CONNECTION_LOST as exc:
                self._drop(exc)
                if attempt == 2 or not METHODS[method]:
                    raise BrokerUnavailable(_describe(exc)) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close this thread's connection (its next call makes a new one)."""
        connection: BrokerConnection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._local.connection = None

    if TYPE_CHECKING:
        # The remote methods are made below, from METHODS; to a type checker
        # the client is whatever Protocol of broker.interface it is used as.
        def __getattr__(self, name: str) -> Callable[..., Any]: ...

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            # Forked: the parent's connections, and any group it had under
            # way, belong to the parent.
            self._local = threading.local()
            self._submits = GroupCommit(self._submit_group)
            self._pid = os.getpid()

    def _connection(self) -> BrokerConnection:
        self._after_fork()
        connection: BrokerConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def _connect(self) -> BrokerConnection:
        try:
            authkey = read_authkey(self._settings)
        except AuthkeyError as exc:
            raise BrokerUnavailable(str(exc)) from None
        try:
            connection = BrokerConnection(self._settings.manager_address(), authkey)
        except AuthenticationError:
            raise BrokerUnavailable("the broker refused our authkey") from None
        except (*_NOT_SENT, *_CONNECTION_LOST) as exc:
            raise BrokerUnavailable(_describe(exc)) from None
        log.info("connected to broker at %s", self._settings.broker_address)
        return connection

    def _drop(self, exc: BaseException) -> None:
        if getattr(self._local, "connection", None) is not None:
            log.warning("lost the broker connection (%s); will reconnect", _describe(exc))
        self.close()


def _remote(method: str) -> Callable[..., Any]:
    def call(self: BrokerClient, *args: Any, **kwargs: Any) -> Any:
        return self.call(method, *args, **kwargs)

    call.__name__ = call.__qualname__ = method
    call.__doc__ = f"``{method}`` on the broker process (see ``broker.interface``)."
    return call


for _method in METHODS:
    if _method not in vars(BrokerClient):
        setattr(BrokerClient, _method, _remote(_method))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
