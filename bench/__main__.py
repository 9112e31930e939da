"""``python -m bench``: measure Formulary beside a no-op ceiling, in one run, on this machine.

Three phases, each on its own freshly started processes (see ``bench/stack.py``):

1. HTTP: broker + API + the ceiling app (and the ceiling plus one broker round
   trip) under the same gunicorn configuration, no workers, for each engine of
   ``--engines`` (``bench/engines.py``: the embedded engine on its journal
   file, PostgreSQL on a durable server started for the run, and two hosts on
   that database). Each repetition runs the ceiling, the round trip, then new
   make-ups (ingest alone), the same make-up (409) and ``GET /formulas/{id}``,
   each scenario on every engine back to back (the engines' order reversed
   every other repetition), so every scenario sees the same conditions;
   figures are medians over repetitions.
2. Pipeline: broker + API + the default worker count. Submit-to-processed
   latency at a steady rate, the workers' drain rate, then new make-ups at full
   load with the workers running (the full pipeline).
3. Scale: for each stored-formula count, a fresh journal filled through the
   broker object, the broker's restart time and memory, and a submit run.

The markdown table goes to stdout, the figures to a JSON file, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench import engines, memory, pipeline, report, scale
from bench.engines import EMBEDDED, POSTGRES, TWO_HOSTS
from bench.load import Aggregate, Generator, LoadResult, LoadSpec, Plan, wrk_available
from bench.stack import ROOT, Stack, StartError, request, start_command

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

log = logging.getLogger("bench")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

RESULTS = ROOT / "bench" / "results"
FULL_SCALE = (0, 100_000, 1_000_000)
DUPLICATE_BODY = b'{"name":"Bench duplicate","materials":[{"name":"Bench Rose","concentration":1}]}'
READ_BODY = b'{"name":"Bench read","materials":[{"name":"Bench Iris","concentration":2}]}'

# key, title, expected status
SCENARIOS = (
    ("ceiling", "no-op Falcon app, parses the JSON body, 202", "202"),
    ("round_trip", "the ceiling plus one broker round trip (ping), 202", "202"),
    ("ingest", "POST /formulas, new make-up, workers stopped", "202"),
    ("pipeline", "POST /formulas, new make-up, workers running", "202"),
    ("duplicate", "POST /formulas, the same make-up", "409"),
    ("get", "GET /formulas/{id}", "200"),
)


@dataclass(frozen=True)
class Config:
    mode: str
    seconds: float
    repeats: int
    connections: int
    threads: int
    workers: int
    warmup: float
    drain: int
    rate: float
    latency_seconds: float
    scale: tuple[int, ...]
    scale_seconds: float
    scale_repeats: int
    generator: Generator
    out: Path
    engines: tuple[str, ...] = (EMBEDDED,)
    engines_note: str = ""  # why an engine of the default set is not measured


def _counts(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(int(part.replace("_", "")) for part in text.split(","))


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds: 1 s runs, one repetition, no scale figures unless --scale",
    )
    parser.add_argument("--seconds", type=float, help="seconds per HTTP run (10; smoke 1)")
    parser.add_argument("--repeats", type=int, help="runs per HTTP scenario (3; smoke 1)")
    parser.add_argument("--connections", type=int, default=8, help="HTTP connections (8)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--scale",
        type=_counts,
        help="stored-formula counts, e.g. 0,100000 (default 0,100000,1000000; smoke none)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="paced submits/s (200)")
    parser.add_argument("--latency-seconds", type=float, help="paced run length (20; smoke 1)")
    parser.add_argument("--drain", type=int, help="messages for the drain rate (5000; smoke 100)")
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), or the pure-Python fallback",
    )
    parser.add_argument(
        "--engines",
        help="engines for ingest, duplicates and GET: embedded,postgres (default both; "
        "postgres is left out, with a warning, where it cannot run unless named here)",
    )
    parser.add_argument("--out", type=Path, help="JSON results (bench/results/latest.json)")
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)
    if args.load == "auto":
        generator: Generator = "wrk" if wrk_available() else "python"
    else:
        generator = args.load
    if generator == "wrk" and not wrk_available():
        parser.error("--load wrk: wrk is not installed (bench/run installs it)")

    def pick(value: float | int | None, full: float | int, quick: float | int) -> float:
        return float(value if value is not None else (quick if smoke else full))

    try:
        chosen = engines.parse_engines(args.engines or ",".join(engines.ENGINES))
    except ValueError as exc:
        parser.error(f"--engines: {exc}")
    note = ""
    if POSTGRES in chosen:
        reason = engines.postgres_unavailable()
        if reason and args.engines:
            parser.error(f"--engines postgres: {reason}")
        if reason:
            chosen = tuple(e for e in chosen if e != POSTGRES)
            note = f"the PostgreSQL engine was not measured: {reason}"
    seconds = pick(args.seconds, 10, 1)
    return Config(
        mode="smoke" if smoke else "full",
        seconds=seconds,
        repeats=int(pick(args.repeats, 3, 1)),
        connections=args.connections,
        threads=args.threads,
        workers=args.workers,
        warmup=0.0 if smoke else 2.0,
        drain=int(pick(args.drain, 5000, 100)),
        rate=args.rate,
        latency_seconds=pick(args.latency_seconds, 20, 1),
        scale=args.scale if args.scale is not None else (() if smoke else FULL_SCALE),
        scale_seconds=1.0 if smoke else 5.0,
        scale_repeats=1 if smoke else 3,
        generator=generator,
        out=args.out or RESULTS / ("smoke.json" if smoke else "latest.json"),
        engines=chosen,
        engines_note=note,
    )


def _check(results: report.Results, label: str, aggregate: Aggregate, expected: str) -> None:
    problem = aggregate.unexpected(expected)
    if problem:
        message = f"{label}: expected only {expected}, got {problem}"
        log.warning("!!!!! %s", message)
        results.warnings.append(message)


def _log_run(key: str, result: LoadResult) -> None:
    log.info(
        "%-10s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  %s%s",
        key,
        result.rps,
        result.p50_ms,
        result.p99_ms,
        result.statuses,
        f" socket errors {result.socket_errors}" if result.socket_errors else "",
    )


ENGINE_SCENARIOS = ("ingest", "duplicate", "get")


def http_phase(config: Config, plan: Plan, results: report.Results) -> None:
    """Ceiling, then ingest, duplicates and reads on each engine, interleaved run by run."""
    # (scenario, engine) -> the loads run at once: one, or one per host.
    specs: dict[tuple[str, str], list[LoadSpec]] = {}
    stacks: list[Stack] = []
    with ExitStack() as exits:
        stack = exits.enter_context(Stack("http"))
        stacks.append(stack)
        apis: dict[str, int] = {}
        second: engines.SecondHost | None = None
        # A gunicorn takes about a second to answer: the first stack's processes are
        # all launched before any is waited for, the PostgreSQL server starts in a
        # thread meanwhile (pg_ctl: the server is not our child), then host A's
        # broker and API start together. Children are launched from this thread
        # only: their PR_SET_PDEATHSIG follows the thread that launched them.
        with ThreadPoolExecutor(max_workers=1) as pool:
            database = None
            if POSTGRES in config.engines:
                database = pool.submit(engines.start_postgres, results.postgres)
                exits.callback(_stop_postgres, database)
            stack.launch_broker()
            ports = {
                "ceiling": stack.launch_server("ceiling", "bench.ceiling:app"),
                "round_trip": stack.launch_server("round_trip", "bench.ceiling:round_trip_app()"),
            }
            if EMBEDDED in config.engines:
                ports["api"] = stack.launch_server("api")
            stack.wait_for_broker()
            for name in ports:
                stack.wait_for_server(name)
            if database is not None:
                _, dsn = database.result()
                host = exits.enter_context(Stack("postgres host A", dsn))
                stacks.append(host)
                apis[POSTGRES] = host.start_server_after_broker()
                second_stack = exits.enter_context(Stack("postgres host B", dsn))
                second = engines.SecondHost(second_stack, plan, apis[POSTGRES], config.warmup)
        specs["ceiling", EMBEDDED] = [plan.spec(ports["ceiling"], "POST", "/formulas", "unique")]
        specs["round_trip", EMBEDDED] = [
            plan.spec(ports["round_trip"], "POST", "/formulas", "unique")
        ]
        if "api" in ports:
            apis = {EMBEDDED: ports["api"], **apis}
        for engine, api in apis.items():
            request(api, "POST", "/formulas", DUPLICATE_BODY)
            status, headers, _ = request(api, "POST", "/formulas", READ_BODY)
            if status != 202:
                raise StartError(f"{engine}: could not store the formula to read back: {status}")
            specs["ingest", engine] = [plan.spec(api, "POST", "/formulas", "unique")]
            specs["duplicate", engine] = [
                plan.spec(api, "POST", "/formulas", "fixed", DUPLICATE_BODY)
            ]
            specs["get", engine] = [plan.spec(api, "GET", headers["location"], "none")]
        if second is not None:
            # Host B runs only for these runs (and warms up for each), so that the
            # one-host runs have one broker woken by each commit's NOTIFY, not two.
            specs["ingest", TWO_HOSTS] = specs["ingest", POSTGRES]
        if config.warmup:
            log.info("warming up (%g s per scenario and engine)", config.warmup)
            for key, loads in specs.items():
                if key[1] != TWO_HOSTS:
                    _run(plan, [replace(spec, seconds=config.warmup) for spec in loads])
        runs: dict[tuple[str, str], list[LoadResult]] = {key: [] for key in specs}
        per_host: list[list[LoadResult]] = []
        for repetition in range(1, config.repeats + 1):
            log.info("HTTP scenarios, repetition %d of %d", repetition, config.repeats)
            for key in _order(specs, repetition):
                if key[1] == TWO_HOSTS and second is not None:
                    result, each = second.run(specs[key][0])
                else:
                    result, each = _run(plan, specs[key])
                _log_run(key[0] if key[1] == EMBEDDED else f"{key[0]} [{key[1]}]", result)
                runs[key].append(result)
                if len(each) > 1:
                    per_host.append(each)
        for started in stacks:  # every gunicorn stops at once, not one after another
            started.terminate_clients()
    for (scenario, engine), found in runs.items():
        _add_scenario(results, scenario, Aggregate.of(found), engine)
    if per_host:
        results.hosts = [Aggregate.of(list(host)) for host in zip(*per_host, strict=True)]


def _stop_postgres(database: Future[tuple[PostgresServer, str]]) -> None:
    """Stop the server once its start is over, if it started."""
    if database.exception() is None:
        database.result()[0].stop()


def _order(specs: dict[tuple[str, str], list[LoadSpec]], repetition: int) -> list[tuple[str, str]]:
    """The ceilings, then each scenario on every engine; the engines reversed every other time."""
    order = [("ceiling", EMBEDDED), ("round_trip", EMBEDDED)]
    for scenario in ENGINE_SCENARIOS:
        here = [key for key in specs if key[0] == scenario]
        order += here if repetition % 2 else here[::-1]
    return order


def _run(plan: Plan, loads: list[LoadSpec]) -> tuple[LoadResult, list[LoadResult]]:
    if len(loads) == 1:
        result = plan.run(loads[0])
        return result, [result]
    return engines.run_together(plan, loads)


def _add_scenario(
    results: report.Results, key: str, aggregate: Aggregate, engine: str = EMBEDDED
) -> None:
    title, expected = next((t, e) for k, t, e in SCENARIOS if k == key)
    results.scenarios.append(report.Scenario(key, title, expected, aggregate, engine))
    keys = [k for k, _, _ in SCENARIOS]
    results.scenarios.sort(key=lambda s: (keys.index(s.key), report.ENGINE_ORDER.index(s.engine)))
    _check(results, key if engine == EMBEDDED else f"{key} [{engine}]", aggregate, expected)


def pipeline_phase(config: Config, plan: Plan, results: report.Results) -> None:
    """Latency at a steady rate, the drain rate, then the full pipeline under load."""
    with Stack("pipeline") as stack:
        stack.start_broker()
        api = stack.start_server("api")
        stack.start_workers(config.workers)
        pipeline.wait_for_workers(stack, api)
        if config.warmup:
            pipeline.paced_latency(stack, api, config.rate, config.warmup)
        log.info(
            "submit-to-processed latency at %g/s for %g s", config.rate, config.latency_seconds
        )
        results.latency = pipeline.paced_latency(stack, api, config.rate, config.latency_seconds)
        if results.latency.non_202:
            _warn(results, f"latency run: {results.latency.non_202} submits were not 202")
        log.info("drain rate: %d messages", config.drain)
        results.drain = pipeline.drain_rate(stack, api, config.drain)
        if results.drain.messages < config.drain:
            _warn(results, f"drain: only {results.drain.messages} of {config.drain} were 202")
        client = stack.client()
        before, started = client.stats(), time.monotonic()
        spec = plan.spec(api, "POST", "/formulas", "unique")
        runs = []
        for repetition in range(1, config.repeats + 1):
            log.info("full pipeline, repetition %d of %d", repetition, config.repeats)
            runs.append(plan.run(spec))
            _log_run("pipeline", runs[-1])
        after, elapsed = client.stats(), time.monotonic() - started
    results.sustained = report.Sustained(
        seconds=elapsed,
        submitted=after.submitted - before.submitted,
        processed=after.processed - before.processed,
        depth_start=before.depth,
        depth_end=after.depth,
    )
    _add_scenario(results, "pipeline", Aggregate.of(runs))


def scale_phase(config: Config, results: report.Results) -> None:
    plan = Plan(config.scale_seconds, config.connections, config.threads, config.generator)
    for count in config.scale:
        point = scale.measure(count, plan, config.scale_repeats, config.warmup)
        results.scale.append(point)
        _check(results, f"scale {count:,} submit", point.submit, "202")


def _warn(results: report.Results, message: str) -> None:
    log.warning("!!!!! %s", message)
    results.warnings.append(message)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    start_command()
    if config.generator == "python":
        log.warning("load from the pure-Python generator: weaker than wrk, figures not comparable")
    results = report.Results(
        mode=config.mode,
        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        generator=config.generator,
        connections=config.connections,
        threads=config.threads,
        seconds=config.seconds,
        repeats=config.repeats,
        workers=config.workers,
        machine=report.machine(),
        engines=list(config.engines),
    )
    results.machine["journal"] = engines.journal_location()
    if config.engines_note:
        _warn(results, config.engines_note)
    plan = Plan(config.seconds, config.connections, config.threads, config.generator)
    started = time.monotonic()
    try:
        http_phase(config, plan, results)
        pipeline_phase(config, plan, results)
        scale_phase(config, results)
        results.memory = memory.measure(2_000 if config.mode == "smoke" else 20_000)
    except KeyboardInterrupt:
        log.error("interrupted: every started process was stopped")
        return EXIT_INTERRUPTED
    except (StartError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        log.error("benchmark failed: %s", exc)
        return EXIT_FAILED
    log.info("done in %.0f s", time.monotonic() - started)
    results.machine["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(report.as_json(results), indent=2) + "\n")
    log.info("results written to %s", config.out)
    print(report.render(results), end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
