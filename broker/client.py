"""Talking to the broker process from another process.

``BrokerClient`` offers every method of ``broker.interface.Broker``: each one
named in ``METHODS`` is made here as a remote call, so the list is never
written out again.

Connections. A call takes an idle connection from the client's pool (the
newest first), or opens one, and puts it back when the answer is in; a
connection that fails is closed, never reused. At most ``max_connections``
calls are under way at once (each holds one connection, and each connection
holds a thread in the broker); further callers wait for a free one. The
pool is the process's own: a client made before ``os.fork`` (as gunicorn
forks) starts afresh in the child. It works the same for threads and for
gevent's greenlets (the API's workers), since every wait is on a lock or a
socket. When the broker goes away calls raise ``BrokerUnavailable``, and the
next call connects afresh, so callers recover by themselves once the broker
is back.

Retries. A call whose request may have reached the broker is sent again only
when the method is ``read_only``. Any other call is sent again only when the
request cannot have been sent: the connection was refused, or the socket was
already closed when we wrote to it. Otherwise the caller gets
``BrokerUnavailable`` and decides (the API answers 503; an
``Idempotency-Key`` makes the client's retry safe).

Submits share round trips: the submits this process's threads make while one
``submit_many`` is under way wait for it to end and go together in the next
(``broker.group``), each still its own atomic step with its own answer.
Reads of a formula by id share them the same way (``get_formulas``); a read
that waits goes in the next group, so it sees everything committed before
it was asked.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing import AuthenticationError
from multiprocessing.managers import RemoteError
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerUnavailable, FormulaNotFound, FormularyError
from broker.formula import FormulaDraft
from broker.group import GroupCommit
from broker.interface import (
    METHODS,
    FormulaView,
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


DEFAULT_MAX_CONNECTIONS = 32


class BrokerClient:
    """A broker in another process, reached over the manager protocol."""

    def __init__(
        self, settings: Settings, *, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> None:
        self._settings = settings
        self._max_connections = max_connections
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[BrokerConnection] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._submits: GroupCommit[SubmitRequest, Submission] = GroupCommit(self._submit_group)
        self._reads: GroupCommit[str, FormulaView] = GroupCommit(self._read_group)

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        self._after_fork()
        return self._submits((draft, idempotency))

    def _submit_group(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        outcomes: list[SubmitOutcome] = self.call("submit_many", requests)
        return outcomes

    def get_formula(self, formula_id: str) -> FormulaView:
        self._after_fork()
        return self._reads(formula_id)

    def _read_group(self, formula_ids: Sequence[str]) -> list[FormulaView | FormulaNotFound]:
        views: list[FormulaView | None] = self.call("get_formulas", list(formula_ids))
        return [
            FormulaNotFound(formula_id) if view is None else view
            for formula_id, view in zip(formula_ids, views, strict=True)
        ]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` on the broker, reconnecting and retrying as the module says."""
        self._after_fork()
        with self._slots:
            for attempt in (1, 2):
                connection = self._take()
                try:
                    result = connection.call(method, args, kwargs)
                except _NOT_SENT as exc:
                    self._drop(connection, exc)
                    if attempt == 2:
                        raise BrokerUnavailable(_describe(exc)) from None
                except _CONNECTION_LOST as exc:
                    self._drop(connection, exc)
                    if attempt == 2 or not METHODS[method]:
                        raise BrokerUnavailable(_describe(exc)) from None
                except (FormularyError, RemoteError):
                    self._give(connection)  # an answer: the connection is fine
                    raise
                except BaseException:
                    connection.close()  # it may be mid-message
                    raise
                else:
                    self._give(connection)
                    return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections (the next call opens a new one)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    if TYPE_CHECKING:
        # The remote methods are made below, from METHODS; to a type checker
        # the client is whatever Protocol of broker.interface it is used as.
        def __getattr__(self, name: str) -> Callable[..., Any]: ...

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            # Forked: the parent's connections, and any group it had under
            # way, belong to the parent.
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._idle = []
            self._slots = threading.BoundedSemaphore(self._max_connections)
            self._submits = GroupCommit(self._submit_group)
            self._reads = GroupCommit(self._read_group)

    def _take(self) -> BrokerConnection:
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        return idle if idle is not None else self._connect()

    def _give(self, connection: BrokerConnection) -> None:
        with self._lock:
            self._idle.append(connection)

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

    def _drop(self, connection: BrokerConnection, exc: BaseException) -> None:
        log.warning("lost the broker connection (%s); will reconnect", _describe(exc))
        connection.close()
        # The others were opened to the same broker: if it went away, so did they.
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
