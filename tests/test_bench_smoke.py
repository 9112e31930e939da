"""The benchmark harness still runs: ``python -m bench --smoke`` end to end.

Not a speed test: it checks that every scenario row is printed and the run
exits 0, so the harness cannot rot unnoticed. The figures are not looked at.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "| ceiling: ",
    "| ingest: ",
    "| pipeline: ",
    "| duplicate: ",
    "| get: ",
    "| drain: ",
    "| sustained: ",
    "| latency@200/s: ",
)


@pytest.mark.processes
@pytest.mark.slow
def test_the_smoke_benchmark_exits_0_and_prints_every_scenario_row(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path / "smoke.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    missing = [row for row in ROWS if row not in done.stdout]
    assert not missing, f"rows missing: {missing}\n{done.stdout}"
    assert (tmp_path / "smoke.json").exists()
