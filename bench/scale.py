"""Scale figures: the broker with 0, 100,000, 1,000,000 stored formulas.

For each count: fill a fresh journal through the broker object
(``python -m bench.fill``, a child process so its memory is returned), start
the broker process on it and time until ``ping()`` answers (the restart time:
interpreter start, journal load, recovery), read its resident memory, then
start the API on it and measure a short run of new-make-up submits (workers
stopped: the submit path alone).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from bench.load import Aggregate, Plan
from bench.stack import ROOT, Stack, temporary_directory

log = logging.getLogger(__name__)

FILL_TIMEOUT = 3600.0


@dataclass
class ScalePoint:
    stored: int
    fill_seconds: float
    journal_bytes: int
    restart_seconds: float
    rss_bytes: int
    rss_after_bytes: int
    submit: Aggregate


def _fill(path: str, count: int, log_path: str) -> float:
    """Run the fill in a child process; the seconds it took (logged there too)."""
    started = time.monotonic()
    with open(log_path, "ab") as output:
        subprocess.run(
            [sys.executable, "-m", "bench.fill", path, str(count)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=FILL_TIMEOUT,
        )
    return time.monotonic() - started


def measure(count: int, plan: Plan, repeats: int, warmup: float = 0.0) -> ScalePoint:
    with temporary_directory() as directory:
        journal = directory / "scale.sqlite3"
        fill_seconds = 0.0
        if count:
            log.info("[scale %d] filling the journal through the broker object", count)
            fill_seconds = _fill(str(journal), count, str(directory / "fill.log"))
            log.info("[scale %d] filled in %.1fs", count, fill_seconds)
        journal_bytes = journal.stat().st_size if journal.exists() else 0
        with Stack(f"scale {count}", journal) as stack:
            restart = stack.start_broker()
            rss = stack.broker_rss()
            port = stack.start_server("api")
            spec = plan.spec(port, "POST", "/formulas", "unique")
            if warmup:
                plan.run(replace(spec, seconds=warmup))
            runs = [plan.run(spec) for _ in range(repeats)]
            rss_after = stack.broker_rss()
    submit = Aggregate.of(runs)
    log.info(
        "[scale %d] restart %.2fs, RSS %.1f MiB, submit %.0f req/s p99 %.2f ms",
        count,
        restart,
        rss / 2**20,
        submit.rps,
        submit.p99_ms,
    )
    return ScalePoint(
        stored=count,
        fill_seconds=fill_seconds,
        journal_bytes=journal_bytes,
        restart_seconds=restart,
        rss_bytes=rss,
        rss_after_bytes=rss_after,
        submit=submit,
    )
