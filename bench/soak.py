"""``python -m bench.soak``: submits from several clients while processes are SIGKILLed.

For ``--seconds``, ``--clients`` threads each submit new make-ups (a
material name nobody else uses) with one ``Idempotency-Key`` per logical
submission, and retry the same body with the same key on ``503``, a refused,
reset or lost connection, or a timeout (capped exponential backoff with full
jitter, until a deadline). Meanwhile the main thread SIGKILLs, one at a time
and at seeded random moments, the broker (restarted on the same journal), one
gunicorn worker (its arbiter forks a replacement) or one consumer worker
(restarted), and times how long the stack takes to recover from each.

Then, with the load stopped and every process back, it waits for the queue to
drain, reads every stored formula back over HTTP and checks that no answered
submission is lost, no make-up is stored twice, no key got two different
answers and every formula is processed. Exit 0 only if every check holds.
The table goes to stdout, progress to stderr, every figure to ``--out``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.engines import start_postgres
from bench.report import machine
from bench.soak_chaos import Chaos
from bench.soak_check import admin_stats, check, get_formula, read_stored, settle
from bench.soak_clients import REQUEST_TIMEOUT, Client, Ledger
from bench.soak_config import Config, SoakError
from bench.soak_report import recoveries, render, verdicts
from bench.stack import ROOT, Stack, StartError, start_command
from broker.admin.__main__ import Unreachable

log = logging.getLogger("bench.soak")

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed: the table says which
EXIT_ERROR = 2  # the soak could not run (a process did not start, a harness bug)
EXIT_INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0, help="load time (default 180)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument(
        "--consumers", type=int, default=2, help="python -m worker processes (default 2)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos (default 1)")
    parser.add_argument(
        "--lease",
        type=float,
        default=5.0,
        help="FORMULARY_VISIBILITY_TIMEOUT: how long a killed consumer's messages wait (default 5)",
    )
    parser.add_argument(
        "--submit-deadline",
        type=float,
        default=60.0,
        help="seconds a logical submission keeps retrying before it is given up (default 60)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="seconds to wait at the end for every formula to be processed (default 120)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "soak.json",
        help="where the figures go as JSON (default bench/results/soak.json)",
    )
    parser.add_argument(
        "--engine",
        choices=("embedded", "postgres"),
        default="embedded",
        help="where the broker keeps its state: the SQLite journal (default), or a PostgreSQL "
        "server started for the run; the broker is restarted on the same one",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="copy every process's log next to --out (soak-logs/) even when every check holds",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.consumers < 1 or args.lease <= 0:
        parser.error("--seconds and --lease must be positive, --clients and --consumers >= 1")
    return Config(
        seconds=args.seconds,
        clients=args.clients,
        consumers=args.consumers,
        seed=args.seed,
        lease=args.lease,
        submit_deadline=args.submit_deadline,
        settle_timeout=args.settle_timeout,
        out=args.out,
        keep_logs=args.keep_logs,
        engine=args.engine,
    )


# -- the run -------------------------------------------------------------------------------


class SoakStack(Stack):
    """The bench stack with a shorter lease, so a killed consumer's messages return sooner."""

    def __init__(self, lease: float, data: str | None = None) -> None:
        super().__init__("soak", data)
        self.lease = lease

    def env(self, port: int | None = None) -> dict[str, str]:
        env = super().env(port)
        env["FORMULARY_VISIBILITY_TIMEOUT"] = f"{self.lease:g}"
        return env


def soak(config: Config) -> dict[str, Any]:
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ledger = Ledger()
    load_stop = threading.Event()
    abort = threading.Event()
    with contextlib.ExitStack() as resources:
        data = None
        if config.engine == "postgres":
            server, data = start_postgres({})
            resources.callback(server.stop)
        stack = resources.enter_context(SoakStack(config.lease, data))
        stack.start_broker()
        port = stack.start_server("api")
        stack.start_workers(config.consumers)
        log.info(
            "soak: %d clients for %.0f s, %d consumers, seed %d; logs in %s",
            config.clients,
            config.seconds,
            config.consumers,
            config.seed,
            stack.directory,
        )
        started = time.monotonic()
        chaos = Chaos(
            stack,
            port,
            ledger,
            random.Random(config.seed),
            started=started,
            lease=config.lease,
        )
        clients = [
            Client(
                i,
                port,
                ledger,
                load_stop=load_stop,
                abort=abort,
                submit_deadline=config.submit_deadline,
                rng=random.Random(config.seed * 1000 + i),
            )
            for i in range(config.clients)
        ]
        threads = [
            threading.Thread(target=c.run, name=f"client{c.index}", daemon=True) for c in clients
        ]
        for thread in threads:
            thread.start()
        try:
            chaos.run(config.seconds)
            load_stop.set()
            log.info("load stopped after %.0f s; waiting for the clients", _since(started))
            for thread in threads:
                thread.join(config.submit_deadline + REQUEST_TIMEOUT + 10)
            if any(t.is_alive() for t in threads):
                raise SoakError("a client did not finish by its deadline")
        except BaseException:
            abort.set()
            load_stop.set()
            raise
        finally:
            chaos.close()
        load_seconds = _since(started)
        try:
            log.info("waiting for the queue to drain")
            stats, settle_seconds, problem = settle(stack, config)
            if problem:
                log.error("%s", problem)
            log.info("reading every stored formula back")
            items, pages = read_stored(port, int(stats.get("formulas", 1_000_000)))
            figures = check(ledger.submissions, items, get_formula(port))
        except SoakError:
            for kill in chaos.kills:
                log.error("kill: %s", _rounded(asdict(kill)))
            keep_logs(stack, config.out.parent / "soak-logs")
            raise
        with contextlib.suppress(Unreachable, SoakError):
            stats = admin_stats(stack)  # after the read: what the broker says now
        checks = verdicts(figures, chaos.kills, problem, stats)
        if config.keep_logs or not all(v.passed for v in checks) or ledger.errors:
            keep_logs(stack, config.out.parent / "soak-logs")
    return {
        "started_at": started_at,
        "config": {**asdict(config), "out": str(config.out)},
        "machine": machine(),
        "load_seconds": round(load_seconds, 1),
        "settle_seconds": round(settle_seconds, 2),
        "listing_pages": pages,
        "figures": asdict(figures),
        "admin_stats": stats,
        "checks": [asdict(v) for v in checks],
        "recoveries": recoveries(chaos.kills),
        "kills": [_rounded(asdict(k)) for k in chaos.kills],
        "harness_errors": ledger.errors,
    }


def keep_logs(stack: Stack, target: Path) -> None:
    """Copy every child's log out of the stack's directory before it is removed."""
    target.mkdir(parents=True, exist_ok=True)
    for path in stack.directory.glob("*.log"):
        (target / path.name).write_bytes(path.read_bytes())
    log.warning("the processes' logs are kept in %s", target)


def _rounded(data: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


def _since(started: float) -> float:
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    start_command()
    try:
        result = soak(config)
    except KeyboardInterrupt:
        log.error("interrupted: every started process was stopped")
        return EXIT_INTERRUPTED
    except (StartError, SoakError, OSError) as exc:
        log.error("the soak could not run: %s", exc)
        return EXIT_ERROR
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("figures written to %s", config.out)
    print(render(result), end="")
    passed = all(v["passed"] for v in result["checks"]) and not result["harness_errors"]
    return EXIT_OK if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
