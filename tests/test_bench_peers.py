"""The peers comparison still runs: ``python -m bench.peers`` end to end, briefly.

Not a speed test: it checks that the run exits 0 and prints a row for every
server it was asked for, and a verdict line for every target. Only the servers
whose dependencies are installed here are asked for (the no-op and Formulary
need nothing beyond the project; the Flask peer needs the ``bench`` extra, the
Redis one also redis-server), so the no-op and Formulary rows are always checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peers, peers_config, peers_servers

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not peers.PEERS_DIR.is_dir(), reason=f"the reference servers are not at {peers.PEERS_DIR}"
)


def test_a_missing_peers_directory_is_a_clear_error_not_a_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--peers-dir", str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == peers.EXIT_USAGE
    assert "nowhere is not there" in done.stderr
    assert done.stdout == ""


@pytest.mark.processes
@pytest.mark.slow
def test_the_short_peers_run_exits_0_and_prints_a_row_per_server(tmp_path: Path) -> None:
    # The no-op, Formulary on its journal, and one Flask peer (two if redis is here):
    # enough to see every kind of server start, take load and stop.
    wanted = ("noop", "seed", "redis_fsync", "formulary")
    servers = [key for key in wanted if key in peers_servers.available_servers()]
    assert {"noop", "formulary"} <= set(servers)
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.peers",
            "--seconds", "1", "--rounds", "1", "--warmup", "0", "--connections", "8",
            "--servers", ",".join(servers), "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for key in servers:
        title = peers_config.BY_KEY[key].title
        row = next((line for line in done.stdout.splitlines() if line.startswith(f"| {title}")), "")
        assert row, f"no row for {key}:\n{done.stdout}"
        assert "not run" not in row and "failed" not in row, row
    assert done.stdout.count("| durable ingest") == 2
    figures = json.loads(out.read_text())
    assert [k for k, v in figures["servers"].items() if v["state"] == "ok"] == servers
    for key in servers:
        assert figures["servers"][key]["scenarios"]["new"]["requests"] > 0
        assert figures["servers"][key]["scenarios"]["same"]["requests"] > 0
