"""The admin socket server: an owner-only Unix socket served from daemon threads.

One thread accepts; each connection gets its own daemon thread, so a client
that connects and says nothing, sends garbage or a line without end holds
only its own thread (and at most :data:`~broker.admin.protocol.MAX_LINE_BYTES`
of buffer) until its idle timeout, and never the broker's lock: commands run
only once a whole line has arrived. At most ``max_connections`` clients are
served at once; one more is told so and closed.

Usage::

    server = AdminServer(settings.admin_socket, AdminCommands(broker))
    server.start()      # binds (or raises), then serves in the background
    ...
    server.close()      # stops accepting, hangs up on clients, removes the file
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from broker.admin.commands import AdminCommands
from broker.admin.protocol import (
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    Frame,
    LineSplitter,
    ProtocolError,
    Reply,
    TooLong,
    decode_line,
    encode_reply,
    error_reply,
    is_blank,
)
from broker.settings import SettingsError
from broker.transport import ensure_private_dir

log = logging.getLogger(__name__)

IDLE_TIMEOUT: Final = 300.0
MAX_CONNECTIONS: Final = 32
RECV_BYTES: Final = 65536
POLL_INTERVAL: Final = 0.1
"""How long ``close`` may wait for the accept loop to notice."""


class AdminSocketBusy(SettingsError):
    """Something live already answers on the admin socket path, or it is not a socket."""


class AdminServer:
    """Serves ``commands`` on a Unix socket at ``path`` (mode 0600) until closed."""

    def __init__(
        self,
        path: Path,
        commands: AdminCommands,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.path = Path(path)
        self.commands = commands
        self.idle_timeout = idle_timeout
        self.max_line_bytes = max_line_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    def start(self) -> None:
        """Bind the socket and serve it in a daemon thread.

        Raises :class:`AdminSocketBusy` if a live server answers at ``path``
        (or ``path`` is not a socket) and ``OSError`` if it cannot bind.
        """
        if self._server is not None:
            raise RuntimeError("the admin server is already started")
        ensure_private_dir(self.path.parent)
        _clear_stale_socket(self.path)
        with _umask(0o077):
            server = _UnixServer(str(self.path), self)
        try:
            os.chmod(self.path, 0o600)
            self._inode = self.path.stat().st_ino
        except OSError:
            server.server_close()
            raise
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="admin-socket",
            daemon=True,
        )
        self._thread.start()
        log.info("admin socket listening on %s", self.path)

    def close(self) -> None:
        """Stop accepting, hang up on connected clients and remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
        self._remove_socket_file()
        log.info("admin socket %s closed", self.path)

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections (each in its own thread) ---------------------------------

    def _admit(self, client: socket.socket) -> bool:
        """Take a connection slot for ``client``, or tell it no and return False."""
        if not self._slots.acquire(blocking=False):
            log.debug("refused an admin connection: %d already open", len(self._clients))
            with contextlib.suppress(OSError):
                _refuse(client, "too many admin connections")
            return False
        with self._clients_lock:
            self._clients.add(client)
        return True

    def _release(self, client: socket.socket) -> None:
        with self._clients_lock:
            self._clients.discard(client)
        self._slots.release()

    def _serve_client(self, client: socket.socket) -> None:
        """Answer ``client`` line by line until it hangs up or idles out."""
        client.settimeout(self.idle_timeout)
        splitter = LineSplitter(self.max_line_bytes)
        try:
            while True:
                try:
                    chunk = client.recv(RECV_BYTES)
                except TimeoutError:
                    log.debug("admin client idle for %.0f s; hanging up", self.idle_timeout)
                    client.sendall(encode_reply(error_reply("idle timeout")))
                    return
                if not chunk:
                    last = splitter.finish()
                    if last is not None:
                        self._answer(client, last)
                    return
                for frame in splitter.feed(chunk):
                    self._answer(client, frame)
        except OSError as exc:
            log.debug("admin client connection failed: %s", exc)

    def _answer(self, client: socket.socket, frame: Frame) -> None:
        reply = self._reply(frame)
        if reply is None:
            return
        try:
            line = encode_reply(reply)
        except (TypeError, ValueError):
            log.exception("cannot encode an admin reply")
            line = encode_reply(error_reply("internal error: the reply is not JSON"))
        client.sendall(line)

    def _reply(self, frame: Frame) -> Reply | None:
        if isinstance(frame, TooLong):
            return error_reply(LINE_TOO_LONG)
        if is_blank(frame):
            return None
        try:
            text = decode_line(frame)
        except ProtocolError as exc:
            return error_reply(str(exc))
        return self.commands.dispatch(text)

    def _remove_socket_file(self) -> None:
        # Only our own file: a newer server may have replaced it meanwhile.
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 16

    def __init__(self, path: str, owner: AdminServer) -> None:
        self.owner = owner
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs in the accept thread: refusing here keeps extra clients threadless.
        if not self.owner._admit(request):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._release(request)  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the traceback to stderr.
        log.exception("admin connection handler failed")


class _Handler(socketserver.BaseRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        self.server.owner._serve_client(self.request)


def _refuse(client: socket.socket, reason: str) -> None:
    """Tell ``client`` why, without blocking, so that it can read the reason."""
    client.setblocking(False)
    client.sendall(encode_reply(error_reply(reason)))
    # Closing a Unix socket with unread input resets the peer, whose pending
    # reply is then lost: stop further input first, then drop what came.
    client.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(BlockingIOError):
        while client.recv(RECV_BYTES):
            pass


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a broker that died; refuse if one is alive."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminSocketBusy(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("removed a stale admin socket file %s", path)
        return
    finally:
        probe.close()
    raise AdminSocketBusy(f"an admin server is already listening on {path}")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    # The umask is per process: held only for the bind, so that the socket
    # never exists with looser permissions, even for an instant.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
