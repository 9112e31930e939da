"""Choosing an engine, and keeping engines out of the processes that only talk to one."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psycopg
import pytest

from broker.engines import EngineError, open_engine
from broker.engines.embedded import EmbeddedBroker
from broker.engines.postgres.convert import pack_materials
from broker.engines.postgres.schema import latest_version, migrate
from broker.engines.postgres.sql import Functions, functions
from broker.errors import DuplicateFormula
from broker.formula import parse_formula
from broker.interface import IdempotencyKey
from broker.settings import Settings
from tests.support import ROOT, environment, free_port

if TYPE_CHECKING:
    from tests.postgres import PostgresServer


def test_a_path_or_memory_opens_the_embedded_engine(tmp_path: Path) -> None:
    for data in (":memory:", str(tmp_path / "journal.sqlite3")):
        engine = open_engine(Settings(data=data))
        try:
            assert isinstance(engine, EmbeddedBroker)
            assert engine.ping() is True
        finally:
            engine.close()
    assert (tmp_path / "journal.sqlite3").exists()


def test_a_postgresql_uri_opens_the_postgresql_engine_and_makes_its_schema(
    postgres_dsn: str,
) -> None:
    engine = open_engine(Settings(data=postgres_dsn))
    try:
        assert type(engine).__name__ == "PostgresBroker" and engine.ping() is True
    finally:
        engine.close()
    with psycopg.connect(postgres_dsn) as connection:
        versions = connection.execute("SELECT version FROM formulary.schema_version").fetchall()
    assert versions == [(version,) for version in range(1, latest_version() + 1)]


HISTORY = Path(__file__).parent / "postgres_history"
"""The migrations as Formulary shipped them before functions.sql: what older databases hold."""


def make_database_of_version(dsn: str, version: int) -> None:
    """A database as Formulary made it at ``version``, with one keyed submit in it."""
    rose = parse_formula(b'{"name": "Rose", "materials": [{"name": "Rose", "concentration": 1}]}')
    owner = [] if version == 1 else [""]  # version 2 gave keys an owner
    with psycopg.connect(dsn) as connection:
        connection.execute("CREATE SCHEMA formulary")
        connection.execute(
            "CREATE TABLE formulary.schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in sorted(HISTORY.glob("*.sql"))[:version]:
            connection.execute(path.read_bytes())
            number, name = path.stem.split("_", 1)
            connection.execute(
                "INSERT INTO formulary.schema_version (version, name) VALUES (%s, %s)",
                [int(number), name],
            )
        row = connection.execute(
            f"SELECT outcome FROM formulary.submit({'%s, ' * len(owner)}'k', 'digest', 3600,"
            " 'formula-1-xxxxxxxxxxxx', 'Rose', %s::jsonb, %s, 'message-1-xxxxxxxxxxxx', 100)",
            [*owner, pack_materials(rose.materials), rose.fingerprint],
        ).fetchone()
        assert row == ("accepted",)


def schema_of(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the schema formulary is made of, for comparing two databases."""
    catalog = {
        "functions": "SELECT p.proname, pg_get_function_identity_arguments(p.oid),"
        " pg_get_functiondef(p.oid) FROM pg_proc p"
        " WHERE p.pronamespace = 'formulary'::regnamespace",
        "columns": "SELECT table_name, ordinal_position, column_name, data_type, is_nullable,"
        " column_default FROM information_schema.columns WHERE table_schema = 'formulary'",
        "constraints": "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)"
        " FROM pg_constraint c WHERE c.connamespace = 'formulary'::regnamespace",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'formulary'",
        "sequences": "SELECT sequence_name FROM information_schema.sequences"
        " WHERE sequence_schema = 'formulary'",
        "versions": "SELECT version, name FROM formulary.schema_version",
        "functions_applied": "SELECT file, checksum FROM formulary.schema_functions",
    }
    with psycopg.connect(dsn) as connection:
        return {
            part: sorted(connection.execute(sql).fetchall(), key=repr)
            for part, sql in catalog.items()
        }


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_database_of_an_older_version_ends_as_a_new_one_and_keeps_its_keys(
    postgres_server: PostgresServer, postgres_dsn: str, version: int
) -> None:
    rose = parse_formula(b'{"name": "Rose", "materials": [{"name": "Rose", "concentration": 1}]}')
    make_database_of_version(postgres_dsn, version)

    engine = open_engine(Settings(data=postgres_dsn))
    try:
        replayed = engine.submit(rose, IdempotencyKey("k", "digest"))
        assert replayed.replayed and replayed.formula.id == "formula-1-xxxxxxxxxxxx"
        with pytest.raises(DuplicateFormula) as other_owner:
            engine.submit(rose, IdempotencyKey("k", "another digest", owner="alice"))
        assert not other_owner.value.replayed
        assert engine.list_keys() == []
        made = engine.create_key("first", ["read"])
        assert engine.list_keys() == [made.key]
    finally:
        engine.close()

    fresh = postgres_server.create_database()
    try:
        open_engine(Settings(data=fresh)).close()
        assert schema_of(postgres_dsn) == schema_of(fresh)
    finally:
        postgres_server.drop_database(fresh)


FUNCTIONS_SQL: Final = (6, "475217e5592f7903aa1c8655d92bfe495d4822c6c4ea80ff05221401acdb7b32")
"""The schema version and the SHA-256 of functions.sql as shipped with it."""


def test_every_change_to_functions_sql_comes_with_a_new_schema_version() -> None:
    # A broker re-applies its own functions.sql wherever the database's differ;
    # only a newer schema version makes an older broker refuse the database
    # (exit 3) instead of putting its older functions back.
    assert (latest_version(), functions().checksum) == FUNCTIONS_SQL, (
        "functions.sql changed: add sql/migrations/NNNN_name.sql (a comment is enough) "
        "and record its version and the file's new checksum in FUNCTIONS_SQL"
    )


PROBE: Final = """
CREATE FUNCTION formulary.probe() RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
"""


def functions_state(connection: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
    """What functions.sql last applied, when, and which functions exist (by oid)."""
    row = connection.execute(
        "SELECT checksum, applied_at FROM formulary.schema_functions WHERE file = %s",
        [functions().file],
    ).fetchone()
    oids = connection.execute(
        "SELECT p.proname, p.oid FROM pg_proc p"
        " WHERE p.pronamespace = 'formulary'::regnamespace ORDER BY p.proname"
    ).fetchall()
    return row, oids


def test_functions_sql_is_applied_again_when_it_changes_and_only_then(postgres_dsn: str) -> None:
    open_engine(Settings(data=postgres_dsn)).close()
    current = functions()
    changed = Functions.of(current.file, current.sql + PROBE)
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        first = functions_state(connection)
        assert first[0][0] == current.checksum
        migrate(connection)
        assert functions_state(connection) == first  # the same file: nothing done

        migrate(connection, changed)
        second = functions_state(connection)
        assert second[0][0] == changed.checksum
        assert "probe" in dict(second[1])
        assert dict(second[1])["submit"] != dict(first[1])["submit"]  # made again
        migrate(connection, changed)
        assert functions_state(connection) == second

        migrate(connection)  # back to the file: a function it no longer has is gone
        third = functions_state(connection)
        assert third[0][0] == current.checksum
        assert sorted(dict(third[1])) == sorted(dict(first[1]))


def test_brokers_starting_together_on_a_new_database_all_start(postgres_dsn: str) -> None:
    # The advisory lock: one migrates, the others wait for it and find the schema current.
    engines: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            engines.append(open_engine(Settings(data=postgres_dsn)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == [] and len(engines) == 4
        assert all(engine.ping() for engine in engines)
    finally:
        for engine in engines:
            engine.close()


def test_a_uri_with_a_password_is_refused_before_connecting() -> None:
    with pytest.raises(EngineError, match="PGPASSWORD") as refused:
        open_engine(Settings(data="postgresql://formulary:s3cret@127.0.0.1:1/formulary"))
    assert "s3cret" not in str(refused.value)


def test_a_database_with_a_newer_schema_is_refused_and_the_broker_exits_3(
    postgres_dsn: str,
) -> None:
    open_engine(Settings(data=postgres_dsn)).close()
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute(
            "INSERT INTO formulary.schema_version (version, name) VALUES (%s, 'from the future')",
            [latest_version() + 1],
        )
    with environment(FORMULARY_DATA=postgres_dsn) as env:
        done = subprocess.run(
            [sys.executable, "-m", "broker"],
            cwd=ROOT,
            env=env.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 3, done.stderr
    assert f"schema is version {latest_version() + 1}, newer than" in done.stderr


def test_an_unreachable_database_is_refused_with_a_message(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(EngineError, match=f"127.0.0.1:{port}/formulary"):
        open_engine(Settings(data=f"postgresql://formulary@127.0.0.1:{port}/formulary"))
    assert list(tmp_path.iterdir()) == []


def test_the_api_the_workers_and_the_admin_cli_load_no_engine() -> None:
    code = (
        "import sys, api.app, worker.consumer, worker.__main__, broker.admin.__main__;"
        "loaded = [m for m in sys.modules"
        " if m in ('sqlite3', 'psycopg') or m.startswith('broker.engines.')];"
        "print(' '.join(loaded))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
