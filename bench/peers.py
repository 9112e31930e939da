"""``python -m bench.peers`` (``bench/run --peers``): Formulary beside its reference servers.

In one run on this machine, on loopback, in a temporary directory: the no-op
Falcon ceiling, the single-process Flask plan, Flask + Redis (``appendfsync
always``, and ``--appendonly no`` for reference), Formulary with its journal
file and Formulary on ``:memory:``. The reference servers are the ones in
``../shared/peers`` (beside the repository), run as their README says, each
with its own best gunicorn configuration; Formulary runs as ``bench/stack.py``
starts it (its own ``gunicorn.conf.py``).

Each server gets a warm-up, then rounds interleaved server by server: in every
round each server in turn takes new make-ups (expect 202) and then the same
make-up (expect 409; sent once before). Figures are medians over the rounds
with their range; the targets compare Formulary (journal) with the peers in
the same run. The markdown goes to stdout, the figures to
``bench/results/peers.json``, progress to stderr. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench.load import Generator, LoadResult, LoadSpec, Plan, wrk_available
from bench.peers_config import BY_KEY, SAME_BODY, SCENARIOS, SERVERS, Config
from bench.peers_report import Results, ServerResult, as_json, machine, render
from bench.peers_servers import Running, available_servers, missing, start_retrying
from bench.stack import ROOT, StartError, start_command, temporary_directory

log = logging.getLogger("bench.peers")

EXIT_OK = 0
EXIT_FAILED = 1  # a server that could be started was not, or broke during the run
EXIT_USAGE = 2  # no peers directory, or a bad option
EXIT_INTERRUPTED = 130

PEERS_DIR = ROOT.parent / "shared" / "peers"
PEER_FILES = ("noop_falcon.py", "seed_flask.py", "redis_flask.py", "formula_common.py")
OUT = ROOT / "bench" / "results" / "peers.json"


# -- the run ------------------------------------------------------------------------------


def _servers(text: str) -> tuple[str, ...]:
    if text.strip() in ("all", ""):
        return tuple(s.key for s in SERVERS)
    if text.strip() == "available":
        return available_servers()
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(BY_KEY)}"
        )
    # Rows and rounds keep the table's order, whatever order they were named in.
    return tuple(s.key for s in SERVERS if s.key in keys)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up seconds per server and scenario (2)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--servers",
        type=_servers,
        default=_servers("all"),
        help=f"comma-separated, from {','.join(BY_KEY)}; 'all' (default) or 'available' "
        "(those whose dependencies are installed)",
    )
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=PEERS_DIR,
        help=f"the reference servers (default ../shared/peers: {PEERS_DIR})",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), or the pure-Python fallback",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON results ({OUT})")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.connections < 1 or args.threads < 1:
        parser.error("--rounds, --seconds, --connections and --threads must be positive")
    generator: Generator = (
        ("wrk" if wrk_available() else "python") if args.load == "auto" else (args.load)
    )
    if generator == "wrk" and not wrk_available():
        parser.error("--load wrk: wrk is not installed (bench/run --peers installs it)")
    return Config(
        seconds=args.seconds,
        rounds=args.rounds,
        warmup=max(0.0, args.warmup),
        connections=args.connections,
        threads=args.threads,
        servers=args.servers,
        peers_dir=args.peers_dir.resolve(),
        generator=generator,
        out=args.out,
    )


def _log_run(key: str, scenario: str, result: LoadResult) -> None:
    log.info(
        "%-16s %-4s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  %s%s",
        key,
        scenario,
        result.rps,
        result.p50_ms,
        result.p99_ms,
        result.statuses,
        f" socket errors {result.socket_errors}" if result.socket_errors else "",
    )


def _fail(result: ServerResult, running: Running | None, reason: str) -> None:
    log.error("%s failed: %s", result.key, reason)
    result.state = "failed"
    result.reason = reason
    if running is not None:
        running.close()


def measure(config: Config, results: Results) -> None:
    plan = Plan(config.seconds, config.connections, config.threads, config.generator)
    running: dict[str, Running] = {}
    specs: dict[str, dict[str, LoadSpec]] = {}
    by_key: dict[str, ServerResult] = {}
    with temporary_directory() as directory, contextlib.ExitStack() as exits:
        for key in config.servers:
            definition = BY_KEY[key]
            result = ServerResult(key, definition.title, "ok")
            results.servers.append(result)
            by_key[key] = result
            lacking = missing(definition.needs)
            if lacking:
                result.state, result.reason = "skipped", "; ".join(lacking)
                log.warning("%s not run: %s", key, result.reason)
                continue
            try:
                server = start_retrying(definition, config, directory)
            except StartError as exc:
                _fail(result, None, str(exc))
                continue
            exits.callback(server.close)
            running[key] = server
            result.commands = server.commands
            result.runs = {scenario: [] for scenario in SCENARIOS}
            specs[key] = {
                "new": plan.spec(server.port, "POST", "/formulas", "unique"),
                "same": plan.spec(server.port, "POST", "/formulas", "fixed", SAME_BODY),
            }

        def run(key: str, spec: LoadSpec) -> LoadResult | None:
            try:
                return plan.run(spec)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                _fail(by_key[key], running.pop(key), f"load run failed: {exc}")
                return None

        if config.warmup:
            log.info("warming up: %g s per server and scenario", config.warmup)
            for key in list(running):
                for spec in specs[key].values():
                    if key in running:
                        run(key, replace(spec, seconds=config.warmup))
        for round_number in range(1, config.rounds + 1):
            log.info("round %d of %d", round_number, config.rounds)
            for key in list(running):
                for scenario, spec in specs[key].items():
                    if key not in running:
                        break
                    found = run(key, spec)
                    if found is None:
                        break
                    _log_run(key, scenario, found)
                    by_key[key].runs[scenario].append(found)
                still = running.get(key)
                dead = still.dead() if still is not None else None
                if still is not None and dead is not None:
                    log.error("%s", still.tails())
                    _fail(by_key[key], running.pop(key), f"{dead.name} exited during the run")
    for result in results.servers:
        for scenario in SCENARIOS:
            agg = result.aggregate(scenario)
            problem = agg.unexpected(result.expected(scenario)) if agg else None
            if problem:
                message = (
                    f"{result.key} {SCENARIOS[scenario]}: expected only "
                    f"{result.expected(scenario)}, got {problem}"
                )
                log.warning("!!!!! %s", message)
                results.warnings.append(message)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    start_command()
    absent = [name for name in PEER_FILES if not (config.peers_dir / name).is_file()]
    if absent:
        where = "is not there" if not config.peers_dir.is_dir() else f"lacks {', '.join(absent)}"
        print(
            f"bench.peers: the reference servers' directory {config.peers_dir} {where}. "
            "They live in ../shared/peers beside the repository; give another place "
            "with --peers-dir PATH.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if config.generator == "python":
        log.warning("load from the pure-Python generator: weaker than wrk, figures not comparable")
    results = Results(
        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        config=config,
        machine=machine(),
    )
    started = time.monotonic()
    try:
        measure(config, results)
    except KeyboardInterrupt:
        log.error("interrupted: every started process was stopped")
        return EXIT_INTERRUPTED
    log.info("done in %.0f s", time.monotonic() - started)
    results.machine["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(as_json(results), indent=2) + "\n")
    log.info("results written to %s", config.out)
    print(render(results), end="")
    failed = [s.key for s in results.servers if s.state == "failed"]
    if failed:
        log.error("failed: %s (see the table)", ", ".join(failed))
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
