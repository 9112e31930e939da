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
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.load import Aggregate, Generator, LoadResult, LoadSpec, Plan, wrk_available
from bench.report import Target
from bench.stack import (
    ROOT,
    Child,
    Stack,
    StartError,
    free_port,
    request,
    start_command,
    temporary_directory,
    wait_until,
)

log = logging.getLogger("bench.peers")

EXIT_OK = 0
EXIT_FAILED = 1  # a server that could be started was not, or broke during the run
EXIT_USAGE = 2  # no peers directory, or a bad option
EXIT_INTERRUPTED = 130

PEERS_DIR = ROOT.parent / "shared" / "peers"
PEER_FILES = ("noop_falcon.py", "seed_flask.py", "redis_flask.py", "formula_common.py")
OUT = ROOT / "bench" / "results" / "peers.json"
PEER_START_TIMEOUT = 30.0
SAME_BODY = b'{"name":"Peers duplicate","materials":[{"name":"Peers Rose","concentration":1}]}'

# The peers' README: "2 x gthread 4" for the no-op and the Redis peer, one sync
# worker for the single-process plan (its state lives in that one process).
GTHREAD_2X4 = ("--workers", "2", "--worker-class", "gthread", "--threads", "4")
SYNC_1 = ("--workers", "1", "--worker-class", "sync")

# scenario key -> what it sends
SCENARIOS = {"new": "new make-up", "same": "same make-up"}


@dataclass(frozen=True)
class ServerDef:
    key: str
    title: str
    needs: tuple[str, ...]  # "flask", "redis-py", "redis-server"
    expected_same: str = "409"


SERVERS = (
    ServerDef("noop", "no-op Falcon (2 x gthread 4)", (), expected_same="202"),
    ServerDef("seed", "single-process Flask plan (1 sync)", ("flask",)),
    ServerDef(
        "redis_nofsync",
        "Flask + Redis, `--appendonly no` (2 x gthread 4)",
        ("flask", "redis-py", "redis-server"),
    ),
    ServerDef(
        "redis_fsync",
        "Flask + Redis, `appendfsync always` (2 x gthread 4)",
        ("flask", "redis-py", "redis-server"),
    ),
    ServerDef("formulary", "Formulary, SQLite journal (its own gunicorn.conf.py)", ()),
    ServerDef("formulary_memory", "Formulary, `FORMULARY_DATA=:memory:`", ()),
)
BY_KEY = {s.key: s for s in SERVERS}


@dataclass(frozen=True)
class Config:
    seconds: float
    rounds: int
    warmup: float
    connections: int
    threads: int
    servers: tuple[str, ...]
    peers_dir: Path
    generator: Generator
    out: Path


# -- dependencies -------------------------------------------------------------------------


def missing(needs: tuple[str, ...]) -> list[str]:
    """What of ``needs`` this machine lacks, each with how to get it."""
    lacking = []
    for need in needs:
        if need == "flask" and importlib.util.find_spec("flask") is None:
            lacking.append("flask is not installed (pip install -e '.[bench]')")
        elif need == "redis-py" and importlib.util.find_spec("redis") is None:
            lacking.append("redis-py is not installed (pip install -e '.[bench]')")
        elif need == "redis-server" and shutil.which("redis-server") is None:
            lacking.append("redis-server is not installed (apt-get install redis-server)")
    return lacking


def available_servers() -> tuple[str, ...]:
    """The servers whose dependencies are all present on this machine."""
    return tuple(s.key for s in SERVERS if not missing(s.needs))


# -- starting the servers -----------------------------------------------------------------


@dataclass
class Running:
    """One server under test, with everything it started (stopped by :meth:`close`)."""

    definition: ServerDef
    port: int = 0
    commands: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    stack: Stack | None = None
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def every_child(self) -> list[Child]:
        found = list(self.children)
        if self.stack is not None:
            if self.stack.broker is not None:
                found.append(self.stack.broker)
            found += [child for child, _ in self.stack.servers.values()]
        return found

    def dead(self) -> Child | None:
        return next((c for c in self.every_child() if not c.alive()), None)

    def tails(self, lines: int = 15) -> str:
        return "\n".join(f"----- {c.name} log (tail):\n{c.tail(lines)}" for c in self.every_child())

    def close(self) -> None:
        self.exits.close()


def _peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORMULARY_", "PYTHONPATH"))}
    env.update(extra or {})
    return env


def _spawn(running: Running, child: Child) -> Child:
    running.children.append(child)
    running.exits.callback(child.stop)
    running.commands.append(" ".join(a if a else '""' for a in child.argv))
    return child.start()


def _redis_answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64).startswith(b"+PONG")


def _start_redis(running: Running, directory: Path, *, fsync: bool) -> int:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix=f"redis-{running.definition.key}-", dir=directory))
    durability = (
        ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
    )
    argv = [
        "redis-server",
        "--save",
        "",
        *durability,
        "--dir",
        str(data),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
    ]
    name = f"redis-server-{running.definition.key}"
    child = _spawn(running, Child(name, argv, _peer_env(), directory / f"{name}.log", directory))

    def ready() -> bool:
        child.check_alive()
        return _redis_answers(port)

    wait_until(ready, timeout=PEER_START_TIMEOUT, what=f"{name} to answer PING")
    return port


def _start_peer_gunicorn(
    running: Running,
    config: Config,
    directory: Path,
    app: str,
    workers: tuple[str, ...],
    env: dict[str, str] | None = None,
) -> int:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--chdir",
        str(config.peers_dir),
        "-b",
        f"127.0.0.1:{port}",
        *workers,
        # gunicorn 27 would otherwise open a control socket under ~/.gunicorn
        "--no-control-socket",
        app,
    ]
    name = running.definition.key
    # cwd is the temporary directory, so no gunicorn.conf.py is picked up by default.
    child = _spawn(running, Child(name, argv, _peer_env(env), directory / f"{name}.log", directory))

    def ready() -> bool:
        child.check_alive()
        return request(port, "GET", "/health", timeout=2.0)[0] == 200

    wait_until(ready, timeout=PEER_START_TIMEOUT, what=f"{name} to answer GET /health")
    return port


def _start_formulary(running: Running, *, in_memory: bool) -> int:
    key = running.definition.key
    stack = running.exits.enter_context(Stack(key, Path(":memory:") if in_memory else None))
    running.stack = stack
    stack.start_broker()
    port = stack.start_server("api")
    data = ":memory:" if in_memory else "<tmp>/journal.sqlite3"
    running.commands += [
        f"FORMULARY_DATA={data} python -m broker",
        f"FORMULARY_DATA={data} FORMULARY_AUTH=off FORMULARY_BIND=127.0.0.1:{port} "
        "gunicorn -c gunicorn.conf.py",
    ]
    return port


def start(definition: ServerDef, config: Config, directory: Path) -> Running:
    """Start one server and wait until it answers; :class:`StartError` if it does not."""
    running = Running(definition)
    try:
        key = definition.key
        if key == "noop":
            running.port = _start_peer_gunicorn(
                running, config, directory, "noop_falcon:app", GTHREAD_2X4
            )
        elif key == "seed":
            running.port = _start_peer_gunicorn(
                running, config, directory, "seed_flask:app", SYNC_1
            )
        elif key in ("redis_fsync", "redis_nofsync"):
            redis_port = _start_redis(running, directory, fsync=key == "redis_fsync")
            running.port = _start_peer_gunicorn(
                running,
                config,
                directory,
                "redis_flask:app",
                GTHREAD_2X4,
                {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
            )
        elif key in ("formulary", "formulary_memory"):
            running.port = _start_formulary(running, in_memory=key == "formulary_memory")
        else:
            raise StartError(f"unknown server {key}")
        status, _, body = request(running.port, "POST", "/formulas", SAME_BODY)
        if status != 202:
            raise StartError(f"the first POST of the same make-up got {status}: {body[:200]!r}")
    except Exception as exc:  # any reason: reported in its row, the others still run
        tails = running.tails()
        running.close()
        raise StartError(f"{exc}\n{tails}") from exc
    except BaseException:
        running.close()
        raise
    log.info("%s up on 127.0.0.1:%d", definition.key, running.port)
    return running


def start_retrying(definition: ServerDef, config: Config, directory: Path) -> Running:
    """:func:`start`, once more on fresh ports if it fails (a free port can be taken meanwhile)."""
    try:
        return start(definition, config, directory)
    except StartError as exc:
        log.warning("%s did not start, trying once more: %s", definition.key, exc)
        return start(definition, config, directory)


# -- results ------------------------------------------------------------------------------


@dataclass
class ServerResult:
    key: str
    title: str
    state: str  # "ok", "skipped" (a dependency is missing), "failed"
    reason: str = ""
    commands: list[str] = field(default_factory=list)
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)

    def aggregate(self, scenario: str) -> Aggregate | None:
        found = self.runs.get(scenario) or []
        return Aggregate.of(found) if found else None

    def expected(self, scenario: str) -> str:
        return "202" if scenario == "new" else BY_KEY[self.key].expected_same


@dataclass
class Results:
    started_at: str
    config: Config
    machine: dict[str, str]
    servers: list[ServerResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def server(self, key: str) -> ServerResult | None:
        return next((s for s in self.servers if s.key == key and s.state == "ok"), None)


def _per_round_ratios(
    top: ServerResult, bottom: ServerResult, scenario: str, p99: bool
) -> list[float]:
    pairs = zip(top.runs.get(scenario, []), bottom.runs.get(scenario, []), strict=False)
    if p99:
        return [a.p99_ms / b.p99_ms for a, b in pairs if b.p99_ms]
    return [a.rps / b.rps for a, b in pairs if b.rps]


def _ratio_target(
    results: Results,
    name: str,
    bottom_key: str,
    scenario: str,
    goal: float,
    *,
    p99: bool = False,
) -> Target:
    sign = "≤" if p99 else "≥"
    top, bottom = results.server("formulary"), results.server(bottom_key)
    a = top.aggregate(scenario) if top else None
    b = bottom.aggregate(scenario) if bottom else None
    if top is None or bottom is None or a is None or b is None:
        return Target(name, f"{sign} {goal:.1f}x", "not measured", None)
    mine, theirs = (a.p99_ms, b.p99_ms) if p99 else (a.rps, b.rps)
    if not theirs:
        return Target(name, f"{sign} {goal:.1f}x", "not measured (a zero figure)", None)
    ratio = mine / theirs
    unit = "ms p99" if p99 else "req/s"
    measured = f"{mine:,.{1 if p99 else 0}f} / {theirs:,.{1 if p99 else 0}f} {unit} = {ratio:.2f}x"
    rounds = _per_round_ratios(top, bottom, scenario, p99)
    if len(rounds) > 1:
        measured += f" (rounds {min(rounds):.2f}-{max(rounds):.2f}x)"
    passed = ratio <= goal if p99 else ratio >= goal
    return Target(name, f"{sign} {goal:.1f}x", measured, passed)


def targets(results: Results) -> list[Target]:
    """The issue's targets: Formulary with its journal against the peers, same run."""
    return [
        _ratio_target(
            results, "durable ingest (new make-up) vs the single-process Flask plan", "seed",
            "new", 1.0,
        ),
        _ratio_target(
            results, "durable ingest (new make-up) vs Flask + Redis, appendfsync always",
            "redis_fsync", "new", 1.5,
        ),
        _ratio_target(
            results, "duplicates (same make-up) vs the single-process Flask plan", "seed",
            "same", 1.0,
        ),
        _ratio_target(
            results, "ingest p99 vs the single-process Flask plan", "seed", "new", 1.0,
            p99=True,
        ),
    ]  # fmt: skip


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _range(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return "-"
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items()) or "0"


def render(results: Results) -> str:
    c, m = results.config, results.machine
    full = c.rounds >= 3 and c.seconds >= 10
    kind = "full run" if full else "short run: smoke figures, not for comparison"
    lines = [
        f"## Formulary beside its peers ({kind}, {results.started_at}, code {m['code']})",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['os']}; Python {m['python']}, "
        f"falcon {m['falcon']}, flask {m['flask']}, gunicorn {m['gunicorn']}, redis-py "
        f"{m['redis-py']}, {m['redis-server']}, SQLite {m['sqlite']}; wrk: {m['wrk']}.",
        f"Load: {c.generator}, -t{c.threads} -c{c.connections}; a {c.warmup:g} s warm-up per "
        f"server and scenario, then {c.rounds} interleaved round(s) x {c.seconds:g} s; "
        "medians over the rounds, min-max beside them; statuses summed. Load average "
        f"(1 min) at start / end: {m['load average at start']} / "
        f"{m.get('load average at end', '?')}.",
        "",
        "| server | new make-up req/s | range | p99 ms | p99 range | same make-up req/s "
        "| range | p99 ms | x no-op (new / same) | statuses: new; same |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    noop = results.server("noop")
    noop_new = noop.aggregate("new") if noop else None
    noop_same = noop.aggregate("same") if noop else None
    for s in results.servers:
        if s.state != "ok":
            what = "not run" if s.state == "skipped" else "**failed**"
            reason = s.reason.splitlines()[0] if s.reason else ""
            if s.state == "failed":
                reason += " (its log: stderr and the JSON)"
            lines.append(f"| {s.title} | {what}: {reason} | | | | | | | | |")
            continue
        new, same = s.aggregate("new"), s.aggregate("same")
        cells: list[str] = []
        flag = ""
        for scenario, agg in (("new", new), ("same", same)):
            if agg is None:
                cells += ["-", "-"] + (["-", "-"] if scenario == "new" else ["-"])
                continue
            if agg.unexpected(s.expected(scenario)):
                flag = " ⚠"
            cells += [f"{agg.rps:,.0f}", _range(agg.rps_runs, ",.0f"), _ms(agg.p99_ms)]
            if scenario == "new":
                cells.append(_range(agg.p99_runs, ".1f"))
        x = "-"
        if new and same and noop_new and noop_same and noop_new.rps and noop_same.rps:
            x = f"{new.rps / noop_new.rps:.2f} / {same.rps / noop_same.rps:.2f}"

        def status_text(agg: Aggregate | None) -> str:
            if agg is None:
                return "-"
            errors = f", socket errors {_counts(agg.socket_errors)}" if agg.socket_errors else ""
            return _counts(agg.statuses) + errors

        lines.append(
            f"| {s.title}{flag} | {' | '.join(cells)} | {x} "
            f"| {status_text(new)}; {status_text(same)} |"
        )
    lines += report.verdict_rows(targets(results), results.warnings)
    return "\n".join(lines) + "\n"


def as_json(results: Results) -> dict[str, Any]:
    config = asdict(results.config)
    config["peers_dir"] = str(results.config.peers_dir)
    config["out"] = str(results.config.out)
    servers: dict[str, Any] = {}
    for s in results.servers:
        entry: dict[str, Any] = {
            "title": s.title,
            "state": s.state,
            "reason": s.reason,
            "commands": s.commands,
            "scenarios": {},
        }
        for scenario in SCENARIOS:
            agg = s.aggregate(scenario)
            if agg is not None:
                entry["scenarios"][scenario] = {
                    "expected": s.expected(scenario),
                    **asdict(agg),
                    "rps_min": min(agg.rps_runs),
                    "rps_max": max(agg.rps_runs),
                }
        servers[s.key] = entry
    return {
        "started_at": results.started_at,
        "config": config,
        "machine": results.machine,
        "servers": servers,
        "targets": [asdict(t) for t in targets(results)],
        "warnings": results.warnings,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    found = report.machine()
    found["flask"] = _version("flask")
    found["redis-py"] = _version("redis")
    server = "redis-server not installed"
    if shutil.which("redis-server"):
        done = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        )
        words = done.stdout.split()
        version = next((w.split("=", 1)[1] for w in words if w.startswith("v=")), "?")
        server = f"redis-server {version}"
    found["redis-server"] = server
    return found


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
