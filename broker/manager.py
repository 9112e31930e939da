"""The broker's transport: serve a ``Broker`` over ``multiprocessing.managers``.

The manager protocol unpickles what it receives, so whoever holds the authkey
can run code in the broker. Hence: the authkey is random, lives in an
owner-only file (or the environment), and the default address is a Unix socket
in an owner-only directory, with the socket itself made owner-only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from multiprocessing.managers import BaseManager, BaseProxy, Server
from pathlib import Path
from typing import Any

from broker.errors import FormularyError
from broker.formula import FormulaDraft
from broker.interface import (
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    IdempotencyKey,
    MessageInfo,
    Submission,
)
from broker.service import EXPOSED, Broker
from broker.settings import Settings, SettingsError

log = logging.getLogger(__name__)

AUTHKEY_BYTES = 32


class AuthkeyError(SettingsError):
    """The authkey file is missing (for a client), unreadable or too open."""


def read_authkey(settings: Settings) -> bytes:
    """The authkey a client uses: from the environment, else from the file."""
    if settings.authkey_hex is not None:
        return bytes.fromhex(settings.authkey_hex)
    path = settings.authkey_file
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise AuthkeyError(
            f"authkey file {path} does not exist (has the broker started?)"
        ) from None
    except OSError as exc:
        raise AuthkeyError(f"cannot read authkey file {path}: {exc.strerror}") from None
    try:
        return bytes.fromhex(key.decode("ascii"))
    except ValueError:
        raise AuthkeyError(f"authkey file {path} does not hold a hex key") from None


def load_or_create_authkey(settings: Settings) -> bytes:
    """The broker's authkey, generated (32 random bytes, mode 0600) on first start."""
    if settings.authkey_hex is not None:
        return bytes.fromhex(settings.authkey_hex)
    path = settings.authkey_file
    ensure_private_dir(path.parent)
    key = secrets.token_bytes(AUTHKEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise AuthkeyError(
                f"authkey file {path} is readable by others (mode {mode:o}); chmod 600 it"
            ) from None
        return read_authkey(settings)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    log.info("generated a new authkey in %s", path)
    return key


def ensure_private_dir(path: Path) -> None:
    """Create a directory for our sockets and keys, owner-only if we create it."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


class BrokerProxy(BaseProxy):
    """Typed client-side stub: one method per exposed broker method."""

    _exposed_ = EXPOSED

    def _remote(self, method: str, *args: Any) -> Any:
        # typeshed declares _callmethod as returning None; it returns the result.
        call: Any = self._callmethod
        return call(method, args)

    def ping(self) -> bool:
        return bool(self._remote("ping"))

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        result: Submission = self._remote("submit", draft, idempotency)
        return result

    def submit_many(
        self, requests: Sequence[tuple[FormulaDraft, IdempotencyKey | None]]
    ) -> list[Submission | FormularyError]:
        result: list[Submission | FormularyError] = self._remote("submit_many", list(requests))
        return result

    def get_formula(self, formula_id: str) -> FormulaView:
        result: FormulaView = self._remote("get_formula", formula_id)
        return result

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        result: list[FormulaView | None] = self._remote("get_formulas", list(formula_ids))
        return result

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        result: FormulaPage = self._remote("list_formulas", limit, cursor)
        return result

    def stats(self) -> BrokerStats:
        result: BrokerStats = self._remote("stats")
        return result

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        result: list[Delivery] = self._remote(
            "receive", consumer, max_messages, visibility_timeout, wait_seconds
        )
        return result

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        return bool(self._remote("complete", receipt, dict(summary)))

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        result: list[str] = self._remote(
            "complete_many", [(receipt, dict(summary)) for receipt, summary in results]
        )
        return result

    def ack(self, receipt: str) -> bool:
        return bool(self._remote("ack", receipt))

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        self._remote("nack", receipt, delay)

    def extend(self, receipt: str, seconds: float) -> float:
        return float(self._remote("extend", receipt, seconds))

    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        result: list[MessageInfo] = self._remote("dead_letters", limit)
        return result

    def redrive(self, message_id: str) -> None:
        self._remote("redrive", message_id)

    def redrive_all(self) -> int:
        return int(self._remote("redrive_all"))

    def message_info(self, message_id: str) -> MessageInfo:
        result: MessageInfo = self._remote("message_info", message_id)
        return result


class BrokerManager(BaseManager):
    """Client side: ``BrokerManager(address, authkey).connect()``, then ``.broker()``."""


BrokerManager.register("broker", proxytype=BrokerProxy, create_method=True)


def make_server(broker: Broker, settings: Settings) -> Server:
    """A manager server for ``broker`` on the configured address, not yet serving."""
    authkey = load_or_create_authkey(settings)

    class _ServingManager(BaseManager):
        pass

    _ServingManager.register("broker", callable=lambda: broker, exposed=EXPOSED)
    address = settings.manager_address()
    if isinstance(address, str):
        ensure_private_dir(Path(address).parent)
        _clear_stale_socket(Path(address))
        with _umask(0o077):
            manager = _ServingManager(address=address, authkey=authkey)
            server = manager.get_server()
        os.chmod(address, 0o600)
    else:
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "broker listens on %s:%d, beyond loopback: anyone who learns the authkey "
                "there can run code in the broker",
                *address,
            )
        manager = _ServingManager(address=address, authkey=authkey)
        server = manager.get_server()
    return server


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a broker that died; refuse if one is alive."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SettingsError(f"another broker is already listening on {path}")


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
