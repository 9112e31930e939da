"""Choosing an engine, and keeping engines out of the processes that only talk to one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.engines import EngineError, open_engine
from broker.engines.embedded import EmbeddedBroker
from broker.settings import Settings
from tests.support import ROOT


def test_a_path_or_memory_opens_the_embedded_engine(tmp_path: Path) -> None:
    for data in (":memory:", str(tmp_path / "journal.sqlite3")):
        engine = open_engine(Settings(data=data))
        try:
            assert isinstance(engine, EmbeddedBroker)
            assert engine.ping() is True
        finally:
            engine.close()
    assert (tmp_path / "journal.sqlite3").exists()


def test_a_postgresql_uri_is_refused_not_taken_for_a_file_name(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="PostgreSQL"):
        open_engine(Settings(data="postgresql://formulary@localhost:5432/formulary"))
    assert list(tmp_path.iterdir()) == []


def test_the_api_the_workers_and_the_admin_cli_load_no_engine() -> None:
    code = (
        "import sys, api.app, worker.consumer, worker.__main__, broker.admin.__main__;"
        "loaded = [m for m in sys.modules if m == 'sqlite3' or m.startswith('broker.engines.')];"
        "print(' '.join(loaded))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
