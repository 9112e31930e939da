"""Process control: the broker, gunicorn and workers on loopback, in a temporary directory.

A :class:`Stack` owns one directory (short, under the system temp dir: Unix
socket paths must stay under ~100 bytes) holding the broker's sockets, its
authkey, its journal and every child's log. Children run in their own sessions
so a Ctrl-C reaches only the harness, which then stops them in order
(workers, web servers, broker) from :meth:`Stack.close`; on Linux they also
get SIGTERM if the harness dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from broker.client import BrokerClient
from broker.errors import BrokerUnavailable
from broker.settings import Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 30.0
START_TIMEOUT = 120.0  # recovering a million formulas takes a while

# Large enough that no scenario is ever refused for capacity (that would be a
# 503 in the figures, not a measurement of the submit path).
QUEUE_CAPACITY = 10_000_000

_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A child did not come up; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` from ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the harness dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.01
) -> float:
    """Poll until ``condition()`` is true; the seconds it took. Errors count as not yet."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (OSError, BrokerUnavailable, http.client.HTTPException):
            pass
        if time.monotonic() - started > timeout:
            raise StartError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Child:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path = ROOT,  # bench/peers.py runs the reference servers elsewhere
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._terminated = False

    def start(self) -> Child:
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        with self.log_path.open("ab") as output:
            self.started_at = time.monotonic()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._terminated = False
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)

    def check_alive(self) -> None:
        if not self.alive():
            raise StartError(f"{self.name} exited early:\n{self.tail()}")

    def terminate(self) -> None:
        """SIGTERM, once, without waiting: :meth:`stop` then waits for the exit."""
        if self.popen is not None and self.popen.poll() is None and not self._terminated:
            self.popen.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Stack:
    """A broker on ``journal``, gunicorn servers and workers, all stopped by :meth:`close`.

    ``journal`` is what ``FORMULARY_DATA`` names: a journal file (by default a
    fresh one in the stack's directory), ``:memory:``, or a ``postgresql://``
    URI; stacks on one URI are hosts sharing one database.
    """

    def __init__(self, label: str, journal: Path | str | None = None) -> None:
        self.label = label
        self.directory = Path(tempfile.mkdtemp(prefix="fb-"))
        self.journal = journal if journal is not None else self.directory / "journal.sqlite3"
        self.broker: Child | None = None
        self.servers: dict[str, tuple[Child, int]] = {}
        # The API answers /health 200 only once it reaches the broker; the
        # ceiling has no /health and answers 404, which is also "listening".
        self._ready: dict[str, set[int]] = {}
        self.workers: list[Child] = []
        self._client: BrokerClient | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            self._log_tails()
        self.close()

    # -- environment ---------------------------------------------------------

    def env(self, port: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORMULARY_")}
        env.update(
            {
                "FORMULARY_BROKER_ADDRESS": str(self.directory / "broker.sock"),
                "FORMULARY_AUTHKEY_FILE": str(self.directory / "authkey"),
                "FORMULARY_DATA": str(self.journal),
                "FORMULARY_ADMIN_SOCKET": str(self.directory / "admin.sock"),
                "FORMULARY_QUEUE_CAPACITY": str(QUEUE_CAPACITY),
                "FORMULARY_LOG_LEVEL": "WARNING",
                # No API keys: the peers (bench/peers.py) check none, so keys would
                # make the comparison unfair; and the load generators (wrk, the soak's
                # clients) send no Authorization. The cost of a key is one cached
                # lookup per request (api/auth.py), measured by nothing here.
                "FORMULARY_AUTH": "off",
                "PYTHONPATH": str(ROOT),
            }
        )
        if port is not None:
            env["FORMULARY_BIND"] = f"127.0.0.1:{port}"
        return env

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def client(self) -> BrokerClient:
        """A broker client for the harness's own thread(s); connects lazily."""
        if self._client is None:
            self._client = BrokerClient(self.settings())
        return self._client

    # -- starting ------------------------------------------------------------

    def start_broker(self) -> float:
        """Start the broker; the seconds from process start until ``ping()`` answers."""
        self.launch_broker()
        return self.wait_for_broker()

    def launch_broker(self) -> None:
        """Start the broker process without waiting for it (:meth:`wait_for_broker`)."""
        broker = Child(
            "broker",
            [sys.executable, "-m", "broker"],
            self.env(),
            self.directory / "broker.log",
        )
        self.broker = broker
        broker.start()

    def wait_for_broker(self) -> float:
        """Wait until the broker answers ``ping()``; the seconds since its process started."""
        broker = self.broker
        if broker is None:
            raise RuntimeError("the broker was not launched")
        probe = BrokerClient(self.settings())

        def answers() -> bool:
            broker.check_alive()
            return bool(probe.ping())

        try:
            wait_until(answers, timeout=START_TIMEOUT, what="the broker to answer ping")
        finally:
            probe.close()
        seconds = time.monotonic() - broker.started_at
        log.info("[%s] broker up in %.2fs (pid %d)", self.label, seconds, broker.pid)
        return seconds

    def start_server(self, name: str, app: str | None = None) -> int:
        """``gunicorn -c gunicorn.conf.py [app]`` on a free loopback port; returns the port.

        With ``app`` the command-line application overrides the config's
        ``wsgi_app``; every other setting is the repository's configuration.
        """
        port = self.launch_server(name, app)
        self.wait_for_server(name)
        return port

    def launch_server(self, name: str, app: str | None = None) -> int:
        """:meth:`start_server` without waiting for it (:meth:`wait_for_server`)."""
        port = free_port()
        argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        if app is not None:
            argv.append(app)
        server = Child(name, argv, self.env(port), self.directory / f"{name}.log")
        self.servers[name] = (server, port)
        self._ready[name] = {200} if app is None else {404}
        server.start()
        return port

    def wait_for_server(self, name: str) -> None:
        """Wait until the server answers HTTP: the API once it reaches the broker."""
        server, port = self.servers[name]
        ready = self._ready[name]

        def listening() -> bool:
            server.check_alive()
            return request(port, "GET", "/health", timeout=2.0)[0] in ready

        wait_until(listening, timeout=START_TIMEOUT, what=f"{name} to answer HTTP")
        log.info("[%s] %s listening on 127.0.0.1:%d", self.label, name, port)

    def start_server_after_broker(self) -> int:
        """Launch the broker and the API together, wait for both; the API's port."""
        self.launch_broker()
        port = self.launch_server("api")
        self.wait_for_broker()
        self.wait_for_server("api")
        return port

    def start_workers(self, count: int, *args: str) -> None:
        for _ in range(count):
            index = len(self.workers)
            worker = Child(
                f"worker{index}",
                [sys.executable, "-m", "worker", *args],
                self.env(),
                self.directory / f"worker{index}.log",
            )
            self.workers.append(worker)
            worker.start()
        log.info("[%s] %d worker(s) started", self.label, count)

    # -- stopping ------------------------------------------------------------

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def stop_server(self, name: str) -> None:
        server, _ = self.servers.pop(name)
        server.stop()

    def stop_broker(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def terminate_clients(self) -> None:
        """SIGTERM every worker and web server at once (a gunicorn takes ~1 s to stop)."""
        for child in [*self.workers, *(server for server, _ in self.servers.values())]:
            child.terminate()

    def close(self) -> None:
        try:
            self.terminate_clients()
            self.stop_workers()
            for name in list(self.servers):
                self.stop_server(name)
            self.stop_broker()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tails(self) -> None:
        children = [self.broker, *(s for s, _ in self.servers.values()), *self.workers]
        for child in children:
            if child is not None:
                log.error("----- %s log (tail):\n%s", child.name, child.tail())

    # -- measuring -----------------------------------------------------------

    def broker_rss(self) -> int:
        if self.broker is None:
            raise RuntimeError("the broker is not running")
        return rss_bytes(self.broker.pid)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection: ``(status, headers (lower-case names), body)``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    """A short-named temporary directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_command() -> None:
    """What every bench command does first: INFO logs on stderr, and SIGTERM as Ctrl-C.

    SIGTERM (and SIGINT, which comes ignored to a command started in the
    background) then unwinds like Ctrl-C, so every process started is
    stopped on the way out.
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
