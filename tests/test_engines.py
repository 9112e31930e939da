"""Choosing an engine, and keeping engines out of the processes that only talk to one."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.engines import EngineError, open_engine
from broker.engines.embedded import EmbeddedBroker
from broker.engines.postgres.schema import latest_version
from broker.engines.postgres.service import pack_materials
from broker.engines.postgres.sql import migrations
from broker.errors import DuplicateFormula
from broker.formula import parse_formula
from broker.interface import IdempotencyKey
from broker.settings import Settings
from tests.support import ROOT, environment, free_port


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


def test_a_version_1_database_is_migrated_and_its_keys_belong_to_no_api_key(
    postgres_dsn: str,
) -> None:
    # A database as Formulary made it before API keys, with one keyed submit in it.
    rose = parse_formula(b'{"name": "Rose", "materials": [{"name": "Rose", "concentration": 1}]}')
    first = migrations()[0]
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute("CREATE SCHEMA formulary")
        connection.execute(
            "CREATE TABLE formulary.schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        connection.execute(first.sql.encode())
        connection.execute(
            "INSERT INTO formulary.schema_version (version, name) VALUES (1, %s)", [first.name]
        )
        row = connection.execute(
            "SELECT outcome FROM formulary.submit('k', 'digest', 3600, 'formula-1-xxxxxxxxxxxx',"
            " 'Rose', %s::jsonb, %s, 'message-1-xxxxxxxxxxxx', 100)",
            [pack_materials(rose.materials), rose.fingerprint],
        ).fetchone()
        assert row == ("accepted",)

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
    with psycopg.connect(postgres_dsn) as connection:
        versions = connection.execute("SELECT version FROM formulary.schema_version").fetchall()
    assert versions == [(version,) for version in range(1, latest_version() + 1)]


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
