"""``python -m bench``: measure Formulary beside a no-op ceiling, in one run, on this machine.

Three phases, each on its own freshly started processes (see ``bench/stack.py``):

1. HTTP: broker + API + the ceiling app (and the ceiling plus one broker round
   trip) under the same gunicorn configuration, no workers. Each repetition
   runs the ceiling, the round trip, new make-ups (ingest alone),
   the same make-up (409) and ``GET /formulas/{id}`` back to back, so every
   scenario sees the same conditions; figures are medians over repetitions.
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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from bench import memory, pipeline, report, scale
from bench.load import Aggregate, Generator, LoadResult, Plan, wrk_available
from bench.stack import ROOT, Stack, StartError, request, start_command

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


def http_phase(config: Config, plan: Plan, results: report.Results) -> None:
    """Ceiling, ingest alone, duplicates and reads, interleaved repetition by repetition."""
    with Stack("http") as stack:
        stack.start_broker()
        api = stack.start_server("api")
        ceiling = stack.start_server("ceiling", "bench.ceiling:app")
        round_trip = stack.start_server("round_trip", "bench.ceiling:round_trip_app()")
        request(api, "POST", "/formulas", DUPLICATE_BODY)
        status, headers, _ = request(api, "POST", "/formulas", READ_BODY)
        if status != 202:
            raise StartError(f"could not store the formula to read back: {status}")
        specs = {
            "ceiling": plan.spec(ceiling, "POST", "/formulas", "unique"),
            "round_trip": plan.spec(round_trip, "POST", "/formulas", "unique"),
            "ingest": plan.spec(api, "POST", "/formulas", "unique"),
            "duplicate": plan.spec(api, "POST", "/formulas", "fixed", DUPLICATE_BODY),
            "get": plan.spec(api, "GET", headers["location"], "none"),
        }
        if config.warmup:
            log.info("warming up (%g s per scenario)", config.warmup)
            for spec in specs.values():
                plan.run(replace(spec, seconds=config.warmup))
        runs: dict[str, list[LoadResult]] = {key: [] for key in specs}
        for repetition in range(1, config.repeats + 1):
            log.info("HTTP scenarios, repetition %d of %d", repetition, config.repeats)
            for key, spec in specs.items():
                result = plan.run(spec)
                _log_run(key, result)
                runs[key].append(result)
    for key, found in runs.items():
        _add_scenario(results, key, Aggregate.of(found))


def _add_scenario(results: report.Results, key: str, aggregate: Aggregate) -> None:
    title, expected = next((t, e) for k, t, e in SCENARIOS if k == key)
    results.scenarios.append(report.Scenario(key, title, expected, aggregate))
    results.scenarios.sort(key=lambda s: [k for k, _, _ in SCENARIOS].index(s.key))
    _check(results, key, aggregate, expected)


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
    )
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
