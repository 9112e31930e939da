"""Test support: run the real processes on temporary sockets and ports, talk HTTP.

Nothing here sleeps hoping something happened: ``wait_for`` polls a condition
until a deadline and fails loudly with what it was waiting for.

API keys. The processes run with ``FORMULARY_AUTH=required`` unless the
environment says ``FORMULARY_TEST_AUTH=off`` (``./scripts/test`` runs the
HTTP-facing modules both ways). Under ``required`` each stack makes a key
with every scope once its broker answers (:meth:`Stack.start_broker`), and
its ``Http`` sends that key with every request, so a test written without
keys in mind runs unchanged; ``Http(port)`` without a token sends none.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

AUTH = os.environ.get("FORMULARY_TEST_AUTH", "required")
"""``FORMULARY_AUTH`` of the processes the tests start (``required`` or ``off``)."""

# The SPEC's example formula.
SUMMER = {
    "name": "Summer Breeze",
    "materials": [
        {"name": "Bergamot Oil", "concentration": 15.5},
        {"name": "Lavender Absolute", "concentration": 10.0},
        {"name": "Sandalwood", "concentration": 5.2},
    ],
}


def wait_for(
    condition: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail until the thing is up
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or condition}"
            ) from last_error
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body, parse_float=Decimal)

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class Http:
    """A tiny HTTP client that sends exactly the bytes and headers it is given.

    With a ``token``, an ``Authorization: Bearer`` header is added to each
    request that does not carry its own.
    """

    def __init__(self, port: int, timeout: float = 30.0, token: str | None = None) -> None:
        self.port = port
        self.timeout = timeout
        self.token = token

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header that carries the token, for other clients (requests, raw sockets)."""
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        all_headers = dict(headers or {})
        if not any(name.lower() == "authorization" for name in all_headers):
            all_headers.update(self.auth_headers)
        if isinstance(body, dict):
            body = json.dumps(body)
            all_headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=all_headers)
            raw = conn.getresponse()
            return Response(raw.status, dict(raw.getheaders()), raw.read())
        finally:
            conn.close()

    def post_json(self, path: str, body: bytes | str | dict[str, Any], **headers: str) -> Response:
        hdrs = {
            "Content-Type": "application/json",
            **{k.replace("_", "-"): v for k, v in headers.items()},
        }
        return self.request("POST", path, body, hdrs)

    def get(self, path: str) -> Response:
        return self.request("GET", path)


@dataclass
class Environment:
    """Settings for one test's processes: a private directory, socket paths, a port."""

    directory: Path
    port: int
    extra: dict[str, str] = field(default_factory=dict)
    durable: bool = False

    @property
    def broker_address(self) -> str:
        return str(self.directory / "broker.sock")

    @property
    def journal(self) -> Path:
        return self.directory / "journal.sqlite3"

    @property
    def admin_socket(self) -> str:
        return str(self.directory / "admin.sock")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORMULARY_")}
        env.update(
            {
                "FORMULARY_BROKER_ADDRESS": self.broker_address,
                "FORMULARY_AUTHKEY_FILE": str(self.directory / "authkey"),
                "FORMULARY_DATA": str(self.journal) if self.durable else ":memory:",
                "FORMULARY_ADMIN_SOCKET": self.admin_socket,
                "FORMULARY_BIND": f"127.0.0.1:{self.port}",
                "FORMULARY_WEB_WORKERS": "2",
                "FORMULARY_LOG_LEVEL": "WARNING",
                "FORMULARY_AUTH": AUTH,
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(self.extra)
        return env

    def settings(self) -> Any:
        from broker.settings import Settings

        return Settings.from_env(self.env())


@contextmanager
def environment(durable: bool = False, **extra: str) -> Iterator[Environment]:
    """A private directory (short: Unix socket paths must stay under ~100 bytes).

    ``durable`` puts the broker's journal in a file there instead of memory.
    """
    with tempfile.TemporaryDirectory(prefix="fm-") as directory:
        yield Environment(Path(directory), free_port(), dict(extra), durable)


class Process:
    """One child process of the stack, with its output kept in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: Environment, extra_env: Mapping[str, str] = {}
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.extra_env = dict(extra_env)
        self.log_path = env.directory / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env={**self.env.env(), **self.extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
        return self.finish(timeout)

    def finish(self, timeout: float = 30.0) -> int:
        """Its exit code once it exits (a stop was asked for), or killed after ``timeout``."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def broker_process(env: Environment) -> Process:
    return Process("broker", [sys.executable, "-m", "broker"], env)


def api_process(env: Environment) -> Process:
    return Process("api", [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], env)


def worker_process(
    env: Environment, *args: str, name: str = "worker", extra_env: Mapping[str, str] = {}
) -> Process:
    return Process(name, [sys.executable, "-m", "worker", *args], env, extra_env)


def wait_for_broker(env: Environment, process: Process, timeout: float = 20.0) -> None:
    from broker.client import BrokerClient

    client = BrokerClient(env.settings())

    def up() -> bool:
        assert process.alive(), f"broker exited:\n{process.output()}"
        return bool(client.ping())

    wait_for(up, timeout=timeout, what="the broker to answer")
    client.close()


def wait_for_api(http: Http, process: Process, timeout: float = 30.0) -> None:
    def up() -> bool:
        assert process.alive(), f"gunicorn exited:\n{process.output()}"
        return http.get("/health").status == 200

    wait_for(up, timeout=timeout, what="the API to answer /health")


class Stack:
    """Broker + gunicorn (+ workers) for one test; stopped and checked on exit."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.http = Http(env.port)
        self.broker = broker_process(env)
        self.api = api_process(env)
        self.workers: list[Process] = []

    def start_broker(self) -> None:
        self.broker = broker_process(self.env).start()
        wait_for_broker(self.env, self.broker)
        self.ensure_key()

    def ensure_key(self) -> None:
        """Under ``FORMULARY_AUTH=required``, give ``http`` a key with every scope.

        The key it has is kept while the broker knows it (a journal survives
        a restart; ``:memory:`` does not), so Idempotency-Keys sent before a
        restart keep their owner after it.
        """
        if not self.env.settings().auth_required:
            return
        from broker.apikeys import SCOPES, parse_secret

        client = self.client()
        try:
            known = self.http.token and parse_secret(self.http.token)
            if not known or client.authenticate(*known) is None:
                self.http.token = client.create_key("tests", SCOPES).secret
        finally:
            client.close()

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.http.auth_headers

    def start_api(self) -> None:
        self.api.start()
        wait_for_api(self.http, self.api)

    def start_worker(self, *args: str, **extra_env: str) -> Process:
        name = f"worker{len(self.workers)}"
        worker = worker_process(self.env, *args, name=name, extra_env=extra_env).start()
        self.workers.append(worker)
        return worker

    def client(self) -> Any:
        from broker.client import BrokerClient

        return BrokerClient(self.env.settings())

    def stop(self) -> None:
        # Workers and gunicorn are asked together, once each (a worker takes a
        # second signal as "exit now"), then the broker they talk to.
        clients = [p for p in (*self.workers, self.api) if p.alive()]
        for process in clients:
            process.signal(signal.SIGTERM)
        for process in clients:
            process.finish()
        self.broker.stop()

    def logs(self) -> str:
        parts = [self.broker, self.api, *self.workers]
        return "\n".join(f"----- {p.name}\n{p.output()}" for p in parts)


@contextmanager
def running_stack(durable: bool = False, **extra: str) -> Iterator[Stack]:
    with environment(durable, **extra) as env:
        stack = Stack(env)
        try:
            stack.start_broker()
            stack.start_api()
            yield stack
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            stack.stop()


def admin_cli(stack: Stack, *args: str) -> dict[str, Any]:
    """``python -m broker.admin --json ARGS`` on ``stack``'s broker, as an operator types it."""
    done = subprocess.run(
        [sys.executable, "-m", "broker.admin", "--json", *args],
        cwd=ROOT,
        env=stack.env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    reply: dict[str, Any] = json.loads(done.stdout)
    assert reply["ok"] is True, reply
    return reply


ACCESS = re.compile(r"api\.access \[(\d+)\] (.*)$")
"""An access log line: the gunicorn worker's pid, then the line's fields."""


def answered_by(stack: Stack) -> dict[str, int]:
    """request_id -> pid of the gunicorn worker that answered it, from the access lines."""
    found: dict[str, int] = {}
    for line in stack.api.output().splitlines():
        match = ACCESS.search(line)
        if match:
            request_id = re.search(r"request_id=(\S+)", match.group(2))
            if request_id:
                found[request_id.group(1)] = int(match.group(1))
    return found
