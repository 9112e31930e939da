"""The throwaway PostgreSQL of tests/postgres.py, checked against the real server.

The PostgreSQL engine's tests trust it to give each test a database of its own, to
survive a crash with what was committed, and to leave nothing running behind.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests import postgres
from tests.postgres import PostgresServer, PostgresUnavailable

pytestmark = pytest.mark.postgres


def count_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM notes").fetchone()
    assert row is not None
    return int(row[0])


def state_and_parent(stat: Path) -> tuple[str, int] | None:
    """From /proc/PID/stat, "PID (name) STATE PPID ...": None once the process is gone."""
    try:
        # The name may hold spaces and parentheses: split after its last ')'.
        state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, IndexError, ValueError):
        return None
    return state, int(ppid)


def server_pids(server: PostgresServer) -> set[int]:
    """The postmaster (first line of postmaster.pid) and its children."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = {
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if (state_and_parent(stat) or ("", 0))[1] == postmaster
    }
    return {postmaster, *children}


def running(pid: int) -> bool:
    # An exited postmaster stays a zombie until init reaps it, which can take a second.
    found = state_and_parent(Path(f"/proc/{pid}/stat"))
    return found is not None and found[0] != "Z"


def test_the_server_accepts_connections_over_tcp_and_its_own_socket(
    postgres_server: PostgresServer,
) -> None:
    with psycopg.connect(postgres_server.dsn()) as conn:
        row = conn.execute("SELECT current_user, current_setting('server_encoding')").fetchone()
    assert row == ("postgres", "UTF8")
    with psycopg.connect(
        host=str(postgres_server.socket_directory),
        port=postgres_server.port,
        user="postgres",
        dbname="postgres",
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_settings_trade_crash_safety_of_the_machine_for_speed_not_of_the_server(
    postgres_server: PostgresServer,
) -> None:
    with psycopg.connect(postgres_server.dsn()) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'full_page_writes', 'synchronous_commit', 'max_connections')"
            ).fetchall()
        )
    assert settings == {
        "fsync": "off",
        "full_page_writes": "off",
        "synchronous_commit": "on",
        "max_connections": "200",
    }


def test_two_created_databases_are_independent_and_dropped_ones_are_gone(
    postgres_server: PostgresServer,
) -> None:
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO notes VALUES ('only in the first')")
    assert count_rows(first) == 1
    with pytest.raises(psycopg.errors.UndefinedTable):
        count_rows(second)

    open_connection = psycopg.connect(first)  # a leftover pool must not block the drop
    postgres_server.drop_database(first)
    postgres_server.drop_database(second.rsplit("/", 1)[1])  # by name too
    open_connection.close()
    for dsn in (first, second):
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            psycopg.connect(dsn).close()


def test_committed_data_survives_an_immediate_restart_and_new_connections_work(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO notes SELECT 'committed ' || n FROM generate_series(1, 100) n")
    held = psycopg.connect(postgres_dsn)

    postgres_server.restart_immediate()

    assert count_rows(postgres_dsn) == 100
    with pytest.raises(psycopg.OperationalError):  # the crash cut it, as it would in production
        held.execute("SELECT 1")
    held.close()


def test_a_stopped_server_refuses_connections_until_it_is_started(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO notes VALUES ('before the crash')")

    postgres_server.stop_immediate()
    try:
        assert not postgres_server.running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_dsn, connect_timeout=5).close()
    finally:
        postgres_server.start()

    assert count_rows(postgres_dsn) == 1


def test_stop_leaves_no_server_process_and_no_files() -> None:
    with PostgresServer() as server:
        pids = server_pids(server)
        assert len(pids) > 1  # the postmaster and its background processes
        assert all(running(pid) for pid in pids)
    assert not any(running(pid) for pid in pids)
    assert not server.directory.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=5).close()


def test_a_named_binaries_directory_without_them_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORMULARY_TEST_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match="FORMULARY_TEST_PG_BINDIR"):
        postgres.find_bindir()


def test_no_binaries_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORMULARY_TEST_PG_BINDIR", raising=False)
    monkeypatch.setattr(postgres, "_candidate_bindirs", lambda: [])
    with pytest.raises(PostgresUnavailable) as raised:
        PostgresServer()
    assert "./scripts/test" in str(raised.value)
    assert "`postgresql` package" in str(raised.value)
