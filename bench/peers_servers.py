"""The reference servers and Formulary as the peers run starts them, and their dependencies.

How each server of ``bench.peers_config.SERVERS`` is started (the peers
under gunicorn as their README says, Redis beside the Redis peer, Formulary
through ``bench/stack.py``), waited for and stopped, and which of them this
machine can run at all, so a missing dependency skips a row instead of
failing the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers_config import SAME_BODY, SERVERS, Config, ServerDef
from bench.stack import Child, Stack, StartError, free_port, request, wait_until

# The entry point's logger: progress lines read "bench.peers" whichever module logs them.
log = logging.getLogger("bench.peers")

PEER_START_TIMEOUT = 30.0

# The peers' README: "2 x gthread 4" for the no-op and the Redis peer, one sync
# worker for the single-process plan (its state lives in that one process).
GTHREAD_2X4 = ("--workers", "2", "--worker-class", "gthread", "--threads", "4")
SYNC_1 = ("--workers", "1", "--worker-class", "sync")


# -- dependencies -------------------------------------------------------------------------


def missing(needs: tuple[str, ...]) -> list[str]:
    """What of ``needs`` this machine lacks, each with how to get it."""
    lacking = []
    for need in needs:
        if need == "flask" and importlib.util.find_spec("flask") is None:
            lacking.append("flask is not installed (pip install -e '.[bench]')")
        elif need == "redis-py" and importlib.util.find_spec("redis") is None:
            lacking.append("redis-py is not installed (pip install -e '.[bench]')")
        elif need == "redis-server" and shutil.which("redis-server") is None:
            lacking.append("redis-server is not installed (apt-get install redis-server)")
    return lacking


def available_servers() -> tuple[str, ...]:
    """The servers whose dependencies are all present on this machine."""
    return tuple(s.key for s in SERVERS if not missing(s.needs))


# -- starting the servers -----------------------------------------------------------------


@dataclass
class Running:
    """One server under test, with everything it started (stopped by :meth:`close`)."""

    definition: ServerDef
    port: int = 0
    commands: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    stack: Stack | None = None
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def every_child(self) -> list[Child]:
        found = list(self.children)
        if self.stack is not None:
            if self.stack.broker is not None:
                found.append(self.stack.broker)
            found += [child for child, _ in self.stack.servers.values()]
        return found

    def dead(self) -> Child | None:
        return next((c for c in self.every_child() if not c.alive()), None)

    def tails(self, lines: int = 15) -> str:
        return "\n".join(f"----- {c.name} log (tail):\n{c.tail(lines)}" for c in self.every_child())

    def close(self) -> None:
        self.exits.close()


def _peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORMULARY_", "PYTHONPATH"))}
    env.update(extra or {})
    return env


def _spawn(running: Running, child: Child) -> Child:
    running.children.append(child)
    running.exits.callback(child.stop)
    running.commands.append(" ".join(a if a else '""' for a in child.argv))
    return child.start()


def _redis_answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64).startswith(b"+PONG")


def _start_redis(running: Running, directory: Path, *, fsync: bool) -> int:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix=f"redis-{running.definition.key}-", dir=directory))
    durability = (
        ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
    )
    argv = [
        "redis-server",
        "--save",
        "",
        *durability,
        "--dir",
        str(data),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
    ]
    name = f"redis-server-{running.definition.key}"
    child = _spawn(running, Child(name, argv, _peer_env(), directory / f"{name}.log", directory))

    def ready() -> bool:
        child.check_alive()
        return _redis_answers(port)

    wait_until(ready, timeout=PEER_START_TIMEOUT, what=f"{name} to answer PING")
    return port


def _start_peer_gunicorn(
    running: Running,
    config: Config,
    directory: Path,
    app: str,
    workers: tuple[str, ...],
    env: dict[str, str] | None = None,
) -> int:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--chdir",
        str(config.peers_dir),
        "-b",
        f"127.0.0.1:{port}",
        *workers,
        # gunicorn 27 would otherwise open a control socket under ~/.gunicorn
        "--no-control-socket",
        app,
    ]
    name = running.definition.key
    # cwd is the temporary directory, so no gunicorn.conf.py is picked up by default.
    child = _spawn(running, Child(name, argv, _peer_env(env), directory / f"{name}.log", directory))

    def ready() -> bool:
        child.check_alive()
        return request(port, "GET", "/health", timeout=2.0)[0] == 200

    wait_until(ready, timeout=PEER_START_TIMEOUT, what=f"{name} to answer GET /health")
    return port


def _start_formulary(running: Running, *, in_memory: bool) -> int:
    key = running.definition.key
    stack = running.exits.enter_context(Stack(key, Path(":memory:") if in_memory else None))
    running.stack = stack
    stack.start_broker()
    port = stack.start_server("api")
    data = ":memory:" if in_memory else "<tmp>/journal.sqlite3"
    running.commands += [
        f"FORMULARY_DATA={data} python -m broker",
        f"FORMULARY_DATA={data} FORMULARY_AUTH=off FORMULARY_BIND=127.0.0.1:{port} "
        "gunicorn -c gunicorn.conf.py",
    ]
    return port


def start(definition: ServerDef, config: Config, directory: Path) -> Running:
    """Start one server and wait until it answers; :class:`StartError` if it does not."""
    running = Running(definition)
    try:
        key = definition.key
        if key == "noop":
            running.port = _start_peer_gunicorn(
                running, config, directory, "noop_falcon:app", GTHREAD_2X4
            )
        elif key == "seed":
            running.port = _start_peer_gunicorn(
                running, config, directory, "seed_flask:app", SYNC_1
            )
        elif key in ("redis_fsync", "redis_nofsync"):
            redis_port = _start_redis(running, directory, fsync=key == "redis_fsync")
            running.port = _start_peer_gunicorn(
                running,
                config,
                directory,
                "redis_flask:app",
                GTHREAD_2X4,
                {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
            )
        elif key in ("formulary", "formulary_memory"):
            running.port = _start_formulary(running, in_memory=key == "formulary_memory")
        else:
            raise StartError(f"unknown server {key}")
        status, _, body = request(running.port, "POST", "/formulas", SAME_BODY)
        if status != 202:
            raise StartError(f"the first POST of the same make-up got {status}: {body[:200]!r}")
    except Exception as exc:  # any reason: reported in its row, the others still run
        tails = running.tails()
        running.close()
        raise StartError(f"{exc}\n{tails}") from exc
    except BaseException:
        running.close()
        raise
    log.info("%s up on 127.0.0.1:%d", definition.key, running.port)
    return running


def start_retrying(definition: ServerDef, config: Config, directory: Path) -> Running:
    """:func:`start`, once more on fresh ports if it fails (a free port can be taken meanwhile)."""
    try:
        return start(definition, config, directory)
    except StartError as exc:
        log.warning("%s did not start, trying once more: %s", definition.key, exc)
        return start(definition, config, directory)
