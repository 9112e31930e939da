"""The engine as a dimension of ``python -m bench``: a durable PostgreSQL, and two hosts on it.

The HTTP phase measures ingest, duplicates and ``GET /formulas/{id}`` on each
engine of ``--engines``, interleaved run by run (see ``bench/__main__.py``):

- ``embedded``: the broker on a SQLite journal file (``synchronous=FULL``, as
  shipped), in the run's temporary directory;
- ``postgres``: the broker on a database of a PostgreSQL server started for
  the run by ``tests/postgres.py``'s :class:`PostgresServer` (the one
  implementation of "a throwaway PostgreSQL"), here with
  :data:`DURABLE_SETTINGS` laid over its test settings and its cluster in the
  system's temporary directory, on disk like the journal, never in /dev/shm.

For ``postgres`` a second host joins the first on the same database for one
more scenario (:class:`SecondHost`: its own broker and gunicorn, its own
sockets, as a second machine would run them), which loads both hosts at once
(:func:`run_together`): the total ingest of two hosts against one database.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench.load import LoadResult, LoadSpec, Plan
from bench.stack import Stack, StartError

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
POSTGRES = "postgres"
TWO_HOSTS = "postgres_2hosts"
ENGINES = (EMBEDDED, POSTGRES)
LABELS = {
    EMBEDDED: "embedded (SQLite journal)",
    POSTGRES: "PostgreSQL, one host",
    TWO_HOSTS: "PostgreSQL, two hosts",
}

# What a production server would run with: every commit flushed to disk before
# it is acknowledged, torn pages guarded. The rest are PostgreSQL's defaults
# where tests/postgres.py shrinks them (it keeps max_connections=200, the C
# locale and its logging settings).
DURABLE_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_init_zero": "on",
    "shared_buffers": "128MB",
    "max_wal_size": "1GB",
}


def parse_engines(text: str) -> tuple[str, ...]:
    """``embedded,postgres`` (any order, no repeats) in the table's order; ValueError."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if unknown or not names:
        raise ValueError(f"engines are a comma-separated choice of {', '.join(ENGINES)}")
    return tuple(name for name in ENGINES if name in names)


def postgres_unavailable() -> str | None:
    """Why this machine cannot run the PostgreSQL engine's figures, or None if it can."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg is not installed (./scripts/bootstrap installs the postgres extra)"
    from tests.postgres import PostgresUnavailable, find_bindir

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        return str(exc)
    return None


def _filesystem(path: Path) -> str:
    """``ext4 on /dev/vda`` for the mount that holds ``path`` (from /proc/mounts)."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                source, point, kind = line.split()[:3]
                inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, kind, source)
    except OSError:
        return "unknown filesystem"
    return f"{best[1]} on {best[2]}"


def _server_version(server: PostgresServer) -> str:
    done = subprocess.run(
        [str(server.bindir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "postgres (version unknown)"


def start_postgres(description: dict[str, str]) -> tuple[PostgresServer, str]:
    """A durable PostgreSQL on disk for the run, and a new database's DSN; :class:`StartError`.

    ``description`` gets the server's version, data directory, filesystem and
    durability settings, for the report. The server's ``stop()`` stops it and
    deletes its data.
    """
    import psycopg

    from tests.postgres import PostgresError, PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer(settings=DURABLE_SETTINGS, in_memory=False)
    except (PostgresError, PostgresUnavailable) as exc:
        raise StartError(f"could not start PostgreSQL: {exc}") from None
    try:
        dsn = server.create_database()
    except psycopg.Error as exc:
        server.stop()
        raise StartError(f"could not create the database: {exc}") from None
    description.update(
        {
            "server": _server_version(server),
            "data directory": f"{server.data} ({_filesystem(server.data)})",
            "settings": ", ".join(
                f"{k}={server.settings[k]}"
                for k in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers")
            ),
        }
    )
    log.info(
        "PostgreSQL up on 127.0.0.1:%d, data in %s (%s)",
        server.port,
        server.data,
        description["settings"],
    )
    return server, dsn


def split(spec: LoadSpec, ports: Sequence[int]) -> list[LoadSpec]:
    """``spec`` shared between ``ports``: its connections and wrk threads divided among them.

    The same offered load as one host gets (8 connections in all by default),
    so the figure says what a second host adds, not what more clients add.
    """
    count = len(ports)
    connections = max(1, spec.connections // count)
    threads = max(1, min(spec.threads // count, connections))
    return [replace(spec, port=p, connections=connections, threads=threads) for p in ports]


class SecondHost:
    """Host B on the database host A uses: started for each two-host run, stopped after it.

    A host that stays up costs the one-host runs something: every commit's
    NOTIFY wakes each broker's listener (measured: ~30 µs of its PostgreSQL
    backend and ~50 µs of the idle broker per commit). So host B's broker and
    API start before each two-host run, warm up, take their half of the load
    beside host A, and stop.
    """

    def __init__(self, stack: Stack, plan: Plan, first: int, warmup: float) -> None:
        self.stack = stack
        self.plan = plan
        self.first = first
        self.warmup = warmup

    def run(self, spec: LoadSpec) -> tuple[LoadResult, list[LoadResult]]:
        """``spec`` split between host A and a fresh host B: the sum, and each host's."""
        try:
            second = self.stack.start_server_after_broker()
            loads = split(spec, [self.first, second])
            if self.warmup:
                run_together(self.plan, [replace(load, seconds=self.warmup) for load in loads])
            return run_together(self.plan, loads)
        finally:
            self.stack.terminate_clients()
            for name in list(self.stack.servers):
                self.stack.stop_server(name)
            self.stack.stop_broker()


def run_together(plan: Plan, specs: Sequence[LoadSpec]) -> tuple[LoadResult, list[LoadResult]]:
    """Run every spec at the same time; the sum over them, and each one's own result.

    The sum: requests and counts added, over the longest run's duration; p50
    and p99 are the worst host's (percentiles of two runs do not add up).
    """
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        each = list(pool.map(plan.run, specs))
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for result in each:
        statuses.update(result.statuses)
        errors.update(result.socket_errors)
    total = LoadResult(
        requests=sum(r.requests for r in each),
        seconds=max(r.seconds for r in each),
        p50_ms=max(r.p50_ms for r in each),
        p99_ms=max(r.p99_ms for r in each),
        statuses=dict(sorted(statuses.items())),
        socket_errors=dict(errors),
        generator=each[0].generator,
    )
    return total, each


def journal_location() -> str:
    """Where the SQLite journal of the run lives (``bench/stack.py``: the temporary directory)."""
    root = Path(tempfile.gettempdir()).resolve()
    return f"{root}/fb-*/journal.sqlite3 ({_filesystem(root)})"
