"""The results of one run: what was measured, the targets, and the markdown tables."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from bench.engines import EMBEDDED, LABELS, POSTGRES, TWO_HOSTS
from bench.load import Aggregate, wrk_available
from bench.memory import MemoryFigures
from bench.pipeline import DrainResult, LatencyResult
from bench.scale import ScalePoint
from bench.stack import ROOT

ENGINE_ORDER = (EMBEDDED, POSTGRES, TWO_HOSTS)
# The PostgreSQL engine's ingest against the embedded engine's, in the same run.
POSTGRES_INGEST_GOAL = 0.7


@dataclass
class Scenario:
    key: str
    title: str
    expected: str
    result: Aggregate
    engine: str = EMBEDDED  # the ceilings are served beside the embedded engine's broker


@dataclass
class Sustained:
    """The full-pipeline runs seen from the broker: processing rate and queue depth."""

    seconds: float
    submitted: int
    processed: int
    depth_start: int
    depth_end: int

    @property
    def processed_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Results:
    mode: str
    started_at: str
    generator: str
    connections: int
    threads: int
    seconds: float
    repeats: int
    workers: int
    machine: dict[str, str]
    scenarios: list[Scenario] = field(default_factory=list)
    sustained: Sustained | None = None
    drain: DrainResult | None = None
    latency: LatencyResult | None = None
    scale: list[ScalePoint] = field(default_factory=list)
    memory: MemoryFigures | None = None
    warnings: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=lambda: [EMBEDDED])
    postgres: dict[str, str] = field(default_factory=dict)  # the server, where its data lives
    hosts: list[Aggregate] = field(default_factory=list)  # two hosts: each one's share

    def scenario(self, key: str, engine: str = EMBEDDED) -> Scenario | None:
        return next((s for s in self.scenarios if s.key == key and s.engine == engine), None)


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run


# -- machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _code_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def machine() -> dict[str, str]:
    wrk = "not installed"
    if wrk_available():
        done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk = (done.stdout or done.stderr).splitlines()[0].split(" Copyright")[0]
    return {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "falcon": _version("falcon"),
        "gunicorn": _version("gunicorn"),
        "simplejson": _version("simplejson"),
        "sqlite": sqlite3.sqlite_version,
        "wrk": wrk,
        "load average at start": f"{os.getloadavg()[0]:.2f}",
        "code": _code_version(),
    }


# -- targets ------------------------------------------------------------------------------


def _ratio_target(name: str, ratio: float | None, goal: float, *, at_most: bool) -> Target:
    sign = "≤" if at_most else "≥"
    if ratio is None:
        return Target(name, f"{sign} {goal:g}x", "not measured", None)
    passed = ratio <= goal if at_most else ratio >= goal
    return Target(name, f"{sign} {goal:g}x", f"{ratio:.2f}x", passed)


def targets(results: Results) -> list[Target]:
    ceiling = results.scenario("ceiling")
    ingest = results.scenario("ingest")
    duplicate = results.scenario("duplicate")

    def rps_ratio(s: Scenario | None) -> float | None:
        if s is None or ceiling is None or not ceiling.result.rps:
            return None
        return s.result.rps / ceiling.result.rps

    def p99_ratio(s: Scenario | None) -> float | None:
        if s is None or ceiling is None or not ceiling.result.p99_ms:
            return None
        return s.result.p99_ms / ceiling.result.p99_ms

    found = [
        _ratio_target("new make-up, ingest alone: req/s", rps_ratio(ingest), 0.60, at_most=False),
        _ratio_target("duplicates (409): req/s", rps_ratio(duplicate), 0.70, at_most=False),
        _ratio_target("new make-up, ingest alone: p99", p99_ratio(ingest), 2.5, at_most=True),
        _ratio_target("duplicates (409): p99", p99_ratio(duplicate), 2.5, at_most=True),
    ]
    sustained = results.sustained
    if sustained is not None and ceiling is not None and ceiling.result.rps:
        ratio = sustained.processed_per_s / ceiling.result.rps
        # wrk submits as fast as it can, so the depth grows whenever submits
        # outrun the workers; what must hold is the rate the workers sustain.
        found.append(
            Target(
                "full pipeline: processing sustained under full load",
                "≥ 0.45x ceiling req/s",
                f"{sustained.processed_per_s:,.0f}/s = {ratio:.2f}x; depth "
                f"{sustained.depth_start:,} → {sustained.depth_end:,}",
                ratio >= 0.45,
            )
        )
    else:
        found.append(Target("full pipeline: processing sustained", "≥ 0.45x", "not measured", None))
    points = {p.stored: p for p in results.scale}
    base, big = points.get(0), points.get(1_000_000)
    if base is not None and big is not None:
        ratio = big.submit.p99_ms / base.submit.p99_ms if base.submit.p99_ms else float("inf")
        found.append(
            Target("submit p99 at 1,000,000 vs at 0", "≤ 1.25x", f"{ratio:.2f}x", ratio <= 1.25)
        )
        per = (big.rss_bytes - base.rss_bytes) / big.stored
        found.append(
            Target(
                "broker memory per stored formula (over the base)",
                "< 1,024 B",
                f"{per:,.0f} B",
                per < 1024,
            )
        )
    else:
        found.append(Target("submit p99 at 1,000,000 vs at 0", "≤ 1.25x", "not measured", None))
        found.append(Target("broker memory per stored formula", "< 1,024 B", "not measured", None))
    found.append(_engine_target(results))
    memory = results.memory
    if memory is not None:
        ratio = memory.key_bytes / memory.formula_bytes
        found.append(
            Target(
                "memory of an Idempotency-Key over its formula's",
                "< 0.5x",
                f"{memory.key_bytes:,.0f} B / {memory.formula_bytes:,.0f} B = {ratio:.2f}x",
                ratio < 0.5,
            )
        )
    if big is not None:
        found.append(
            Target(
                "recovery of 1,000,000 formulas",
                "< 10 s",
                f"{big.restart_seconds:.1f} s",
                big.restart_seconds < 10,
            )
        )
    else:
        found.append(Target("recovery of 1,000,000 formulas", "< 10 s", "not measured", None))
    return found


def _per_repetition(top: Aggregate, bottom: Aggregate) -> list[float]:
    """The ratio of two scenarios' req/s in each repetition (their runs were back to back)."""
    return [a / b for a, b in zip(top.rps_runs, bottom.rps_runs, strict=False) if b]


def _engine_target(results: Results) -> Target:
    name = "PostgreSQL ingest vs the embedded engine's, same run: req/s"
    goal = f"≥ {POSTGRES_INGEST_GOAL:g}x"
    postgres, embedded = results.scenario("ingest", POSTGRES), results.scenario("ingest")
    if postgres is None or embedded is None or not embedded.result.rps:
        return Target(name, goal, "not measured", None)
    ratio = postgres.result.rps / embedded.result.rps
    measured = f"{postgres.result.rps:,.0f} / {embedded.result.rps:,.0f} = {ratio:.2f}x"
    rounds = _per_repetition(postgres.result, embedded.result)
    if len(rounds) > 1:
        measured += f" (repetitions {min(rounds):.2f}-{max(rounds):.2f}x)"
    return Target(name, goal, measured, ratio >= POSTGRES_INGEST_GOAL)


# -- rendering ----------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items()) or "0"


def _scenario_rows(results: Results) -> list[str]:
    ceiling = results.scenario("ceiling")
    rows = [
        "| scenario | req/s | x ceiling | p50 ms | p99 ms | p99 x ceiling | statuses "
        "| socket errors |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in results.scenarios:
        if s.engine != EMBEDDED:
            continue  # in the engines' table
        r = s.result
        rps_x = p99_x = "-"
        if ceiling is not None and ceiling.result.rps and ceiling.result.p99_ms:
            rps_x = f"{r.rps / ceiling.result.rps:.2f}"
            p99_x = f"{r.p99_ms / ceiling.result.p99_ms:.2f}"
        flag = " ⚠" if r.unexpected(s.expected) else ""
        rows.append(
            f"| {s.key}: {s.title}{flag} | {r.rps:,.0f} | {rps_x} | {_ms(r.p50_ms)} "
            f"| {_ms(r.p99_ms)} | {p99_x} | {_counts(r.statuses)} | {_counts(r.socket_errors)} |"
        )
    return rows


def _engine_rows(results: Results) -> list[str]:
    """Ingest, duplicates and GET on every engine, with the ceiling beside them."""
    if results.engines == [EMBEDDED]:
        return []
    ceiling = results.scenario("ceiling")
    rows = [
        "| scenario | engine | req/s | x ceiling | x embedded | p50 ms | p99 ms "
        "| p99 x ceiling | req/s per repetition | statuses |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    if ceiling is not None:
        c = ceiling.result
        rows.append(
            f"| ceiling | - | {c.rps:,.0f} | 1.00 | - | {_ms(c.p50_ms)} | {_ms(c.p99_ms)} "
            f"| 1.00 | {_runs(c)} | {_counts(c.statuses)} |"
        )
    for s in results.scenarios:
        if s.key not in ("ingest", "duplicate", "get"):
            continue
        r = s.result
        rps_x = p99_x = vs_embedded = "-"
        if ceiling is not None and ceiling.result.rps and ceiling.result.p99_ms:
            rps_x = f"{r.rps / ceiling.result.rps:.2f}"
            p99_x = f"{r.p99_ms / ceiling.result.p99_ms:.2f}"
        embedded = results.scenario(s.key)
        if embedded is not None and embedded.result.rps:
            vs_embedded = f"{r.rps / embedded.result.rps:.2f}"
        flag = " ⚠" if r.unexpected(s.expected) else ""
        errors = f"; socket errors {_counts(r.socket_errors)}" if r.socket_errors else ""
        rows.append(
            f"| {s.key}{flag} | {LABELS[s.engine]} | {r.rps:,.0f} | {rps_x} | {vs_embedded} "
            f"| {_ms(r.p50_ms)} | {_ms(r.p99_ms)} | {p99_x} | {_runs(r)} "
            f"| {_counts(r.statuses)}{errors} |"
        )
    one, two = results.scenario("ingest", POSTGRES), results.scenario("ingest", TWO_HOSTS)
    if one is not None and two is not None and one.result.rps:
        shares = " + ".join(f"{h.rps:,.0f}" for h in results.hosts)
        rounds = _per_repetition(two.result, one.result)
        spread = f" (repetitions {min(rounds):.2f}-{max(rounds):.2f}x)" if len(rounds) > 1 else ""
        rows += [
            "",
            f"Two hosts on one database: {two.result.rps:,.0f} req/s of ingest in all "
            f"(each host's median: {shares}; p99 is the worse host's), "
            f"{two.result.rps / one.result.rps:.2f}x one host on PostgreSQL{spread}. Both "
            "hosts' processes share this machine's cores, the load is the same "
            f"{results.connections} connections split between them, and host B runs only "
            "for these runs.",
        ]
    if results.postgres:
        p = results.postgres
        rows += [
            "",
            f"PostgreSQL: {p.get('server', '?')}, data in {p.get('data directory', '?')}; "
            f"{p.get('settings', '?')}. Embedded journal: "
            f"{results.machine.get('journal', '?')}, `synchronous=FULL`.",
        ]
    return rows


def _runs(r: Aggregate) -> str:
    return " / ".join(f"{rps:,.0f}" for rps in r.rps_runs)


def _pipeline_rows(results: Results) -> list[str]:
    ceiling = results.scenario("ceiling")
    ceiling_rps = ceiling.result.rps if ceiling is not None else 0.0

    def times(rate: float) -> str:
        return f"{rate / ceiling_rps:.2f}" if ceiling_rps else "-"

    rows = ["| pipeline figure | value | x ceiling req/s |", "|---|---:|---:|"]
    if results.drain is not None:
        d = results.drain
        rows.append(
            f"| drain: {d.messages:,} queued messages, {results.workers} worker(s) "
            f"| {d.per_second:,.0f} processed/s | {times(d.per_second)} |"
        )
    if results.sustained is not None:
        s = results.sustained
        rows.append(
            f"| sustained: processed during the full-pipeline runs ({s.seconds:.0f} s) "
            f"| {s.processed_per_s:,.0f} processed/s | {times(s.processed_per_s)} |"
        )
        rows.append(
            f"| sustained: queue depth before → after | {s.depth_start:,} → {s.depth_end:,} | |"
        )
    if results.latency is not None:
        lat = results.latency
        rows.append(
            f"| latency@{lat.target_rate:g}/s: submit → processed p50 / p99 / max "
            f"({lat.submitted:,} submits at {lat.achieved_rate:,.1f}/s) "
            f"| {_ms(lat.p50_ms)} / {_ms(lat.p99_ms)} / {_ms(lat.max_ms)} ms | |"
        )
    return rows


def _scale_rows(results: Results) -> list[str]:
    if not results.scale:
        return []
    base = next((p for p in results.scale if p.stored == 0), None)
    rows = [
        "| stored formulas | fill s | journal MiB | restart (recover) s | broker RSS MiB "
        "| B/formula over 0 | submit req/s | submit p99 ms | p99 x at 0 | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in results.scale:
        per = p99_x = "-"
        if base is not None and p.stored:
            per = f"{(p.rss_bytes - base.rss_bytes) / p.stored:,.0f}"
        if base is not None and base.submit.p99_ms:
            p99_x = f"{p.submit.p99_ms / base.submit.p99_ms:.2f}"
        flag = " ⚠" if p.submit.unexpected("202") else ""
        rows.append(
            f"| scale {p.stored:,}{flag} | {p.fill_seconds:.1f} | {p.journal_bytes / 2**20:.1f} "
            f"| {p.restart_seconds:.2f} | {p.rss_bytes / 2**20:.1f} | {per} "
            f"| {p.submit.rps:,.0f} | {_ms(p.submit.p99_ms)} | {p99_x} "
            f"| {_counts(p.submit.statuses)} |"
        )
    return rows


def render(results: Results) -> str:
    m = results.machine
    lines = [
        f"## Formulary benchmark ({results.mode} run, {results.started_at}, code {m['code']})",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory']}, {m['os']}; Python "
        f"{m['python']}, falcon {m['falcon']}, gunicorn {m['gunicorn']}, simplejson "
        f"{m['simplejson']}, SQLite {m['sqlite']}; wrk: {m['wrk']}.",
        f"Load generator: {results.generator}, {results.connections} connections, "
        f"{results.threads} thread(s), {results.repeats} x {results.seconds:g} s per HTTP "
        "scenario (medians; status counts summed); gunicorn.conf.py defaults; "
        f"{results.workers} worker process(es) where workers run. Load average (1 min) at "
        f"start / end: {m['load average at start']} / {m.get('load average at end', '?')}.",
        "",
        *_scenario_rows(results),
    ]
    engine_rows = _engine_rows(results)
    if engine_rows:
        lines += ["", *engine_rows]
    lines += ["", *_pipeline_rows(results)]
    scale = _scale_rows(results)
    if scale:
        lines += ["", *scale]
    if results.memory is not None:
        memory = results.memory
        lines += [
            "",
            f"Broker memory (tracemalloc, {memory.count:,} submits each, `bench/memory.py`): "
            f"{memory.formula_bytes:,.0f} B per formula, {memory.key_bytes:,.0f} B more per "
            "Idempotency-Key.",
        ]
    lines += verdict_rows(targets(results), results.warnings)
    return "\n".join(lines) + "\n"


def verdict_rows(found: list[Target], warnings: list[str]) -> list[str]:
    """The targets as a markdown table, then the run's warnings."""
    lines = ["", "| target | goal | measured | result |", "|---|---|---|---|"]
    for t in found:
        verdict = "not measured" if t.passed is None else ("pass" if t.passed else "**miss**")
        lines.append(f"| {t.name} | {t.goal} | {t.measured} | {verdict} |")
    if warnings:
        lines += ["", *(f"**WARNING: {w}**" for w in warnings)]
    return lines


def as_json(results: Results) -> dict[str, Any]:
    """Every figure, the derived rates and the targets, as plain JSON data."""
    document = asdict(results)
    if results.drain is not None:
        document["drain"]["per_second"] = results.drain.per_second
    if results.sustained is not None:
        document["sustained"]["processed_per_s"] = results.sustained.processed_per_s
    document["targets"] = [asdict(t) for t in targets(results)]
    return document
