"""The peers run's results: the figures per server, the targets, the markdown and JSON.

One ``Results`` feeds both the table on stdout and ``bench/results/peers.json``,
so the two cannot disagree; the machine description (with the peers' own
versions) goes into both.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from bench import report
from bench.load import Aggregate, LoadResult
from bench.peers_config import BY_KEY, SCENARIOS, Config
from bench.report import Target


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
