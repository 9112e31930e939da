"""The broker's transport: its ``multiprocessing.managers`` server and the client half.

The broker process serves one engine object with :func:`make_server`,
exposing exactly ``broker.interface.METHODS``; other processes reach it
through :class:`BrokerConnection` (``broker.client`` adds reconnection and
retries on top).

The manager protocol unpickles what it receives, so whoever holds the authkey
can run code in the broker. Hence: the authkey is random, lives in an
owner-only file (or the environment), and the default address is a Unix socket
in an owner-only directory, with the socket itself made owner-only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
from multiprocessing.connection import answer_challenge, deliver_challenge
from multiprocessing.managers import BaseManager, RemoteError, Server
from pathlib import Path
from typing import Any, Final, cast

from broker.interface import METHODS, Broker
from broker.settings import Settings, SettingsError

log = logging.getLogger(__name__)

AUTHKEY_BYTES: Final = 32
CONNECT_TIMEOUT: Final = 5.0
"""Seconds to connect and authenticate before giving up on the broker."""
TYPEID: Final = "broker"
"""The name the broker object is registered under on the manager server."""


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


class BrokerConnection:
    """One connection to the broker's manager server, speaking its wire protocol.

    The broker is a ``multiprocessing.managers`` server; this is the client
    half of that protocol, written out instead of ``BaseProxy``, for two
    reasons. A ``BaseProxy`` shares one connection per thread and address
    among every proxy of the process and keeps it after a failed call, so
    after a broker restart a new proxy could reuse a dead socket, or one
    reconnected to the new broker where the old object id means nothing; here
    a connection belongs to one ``BrokerConnection``, and a failure ends it.
    And ``multiprocessing.connection`` reads and writes the raw file
    descriptor, which blocks a whole process under an event loop; here every
    byte goes through a ``socket`` object, so under gevent (the API's
    workers) a call waits cooperatively like any other socket.

    The exchange: a first connection asks the server to ``create`` the
    registered ``broker`` (the server hands back the one broker object's id);
    a second one asks it to ``accept_connection`` and from then on carries
    ``(id, method, args, kwargs)`` requests, each answered by a
    ``(kind, result)`` pair. Both authenticate with the authkey by the
    standard library's challenge. Messages are pickles framed as
    ``multiprocessing.connection`` frames them. Not thread-safe: one caller
    at a time.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        authkey: bytes,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        with contextlib.closing(_Channel.open(address, authkey, connect_timeout)) as first:
            ident, _exposed = _exchange(first, None, "create", (TYPEID,), {})
        self._ident: str = ident
        self._channel = _Channel.open(address, authkey, connect_timeout)
        try:
            name = f"client-{os.getpid()}-{threading.get_ident()}"
            _exchange(self._channel, None, "accept_connection", (name,), {})
        except BaseException:
            self._channel.close()
            raise

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``method`` on the broker: its result, or the exception it raised (unpickled)."""
        return _exchange(self._channel, self._ident, method, args, kwargs)

    def close(self) -> None:
        self._channel.close()


class _Channel:
    """``multiprocessing.connection``'s framing over a socket: a 4-byte length, then bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(
        cls, address: str | tuple[str, int], authkey: bytes, connect_timeout: float
    ) -> _Channel:
        """Connect and authenticate (both ways, as ``multiprocessing.connection.Client``)."""
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = cls(sock)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(address)
            # The standard library's own challenge, so the digest always
            # matches what this Python's manager server expects.
            answer_challenge(cast(Any, channel), authkey)
            deliver_challenge(cast(Any, channel), authkey)
            # Calls may wait as long as a long poll does.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return channel

    def send_bytes(self, data: bytes) -> None:
        size = len(data)
        if size > 0x7FFFFFFF:
            self._sock.sendall(struct.pack("!iQ", -1, size))
            self._sock.sendall(data)
        else:
            # One write for header and body: no Nagle delay between them.
            self._sock.sendall(struct.pack("!i", size) + data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        (size,) = struct.unpack("!i", self._read(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read(8))
        if maxlength is not None and size > maxlength:
            raise OSError(f"message of {size} bytes, more than {maxlength}")
        return self._read(size)

    def send(self, message: Any) -> None:
        self.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self._sock.recv_into(view[got:])
            if not count:
                raise EOFError("the broker closed the connection")
            got += count
        return bytes(buffer)


def _exchange(
    channel: _Channel,
    ident: str | None,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """One request and its answer, as ``multiprocessing.managers.Server`` speaks them.

    The server answers ``("#RETURN", result)``, ``("#ERROR", exception)`` for
    an exception the method raised, or a traceback's text when it could not
    run the call at all (``#TRACEBACK``: say, a method it does not expose;
    ``#UNSERIALIZABLE``: a result that does not pickle).
    """
    channel.send((ident, method, args, kwargs))
    kind, result = channel.recv()
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    raise RemoteError(f"{kind} from the broker calling {method!r}:\n{result}")


def make_server(broker: Broker, settings: Settings) -> Server:
    """A manager server for ``broker`` on the configured address, not yet serving."""
    authkey = load_or_create_authkey(settings)

    class _ServingManager(BaseManager):
        pass

    _ServingManager.register(TYPEID, callable=lambda: broker, exposed=tuple(METHODS))
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
