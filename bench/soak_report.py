"""The soak's report: the verdict of each check, the recovery times, the markdown table.

The table goes to stdout; the same verdicts and rows go into the JSON
figures, so the file and the table cannot disagree.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.soak_chaos import KINDS, RECOVERED_WHEN, Kill
from bench.soak_check import SAMPLE_GETS, Figures

KIND_TITLES = {
    "broker": "broker (restarted on its journal)",
    "web": "gunicorn worker (arbiter replaces it)",
    "consumer": "consumer worker (restarted)",
}


@dataclass(frozen=True)
class Verdict:
    name: str
    value: str
    passed: bool


def recoveries(kills: Sequence[Kill]) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        mine = [k for k in kills if k.kind == kind]
        times = [k.seconds for k in mine if k.seconds is not None]
        rows.append(
            {
                "kind": kind,
                "kills": len(mine),
                "recovered": len(times),
                "median_s": round(statistics.median(times), 3) if times else None,
                "max_s": round(max(times), 3) if times else None,
                "recovered_when": RECOVERED_WHEN[kind],
            }
        )
    return rows


def verdicts(
    f: Figures, kills: Sequence[Kill], settle_problem: str, stats: dict[str, Any]
) -> list[Verdict]:
    kinds = Counter(k.kind for k in kills)
    failed = [k for k in kills if k.seconds is None]
    return [
        Verdict("formulas lost", str(f.lost), f.lost == 0),
        Verdict("stored twice", str(f.twice), f.twice == 0),
        Verdict("keys answered differently", str(f.differently), f.differently == 0),
        Verdict("formulas not processed", str(f.not_processed), f.not_processed == 0),
        Verdict("submissions unanswered by their deadline", str(f.unanswered), f.unanswered == 0),
        Verdict("unexpected answers", str(f.unexpected), f.unexpected == 0),
        Verdict(
            "every kill recovered",
            f"{len(kills) - len(failed)} of {len(kills)}",
            not failed,
        ),
        Verdict(
            "each kind killed at least once",
            ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS),
            all(kinds[kind] for kind in KINDS),
        ),
        Verdict("stack whole and drained at the end", settle_problem or "yes", not settle_problem),
        Verdict("stored formulas no client sent", str(f.foreign), f.foreign == 0),
        Verdict(
            "stored formulas = admin stats formulas",
            f"{f.stored} = {stats.get('formulas', '?')}",
            f.stored == stats.get("formulas"),
        ),
        Verdict(
            "listing consistent (no repeats; GET /formulas/{id} agrees)",
            f"{f.listed_twice} repeated, {f.get_mismatches} of {SAMPLE_GETS} sampled disagree",
            f.listed_twice == 0 and f.get_mismatches == 0,
        ),
    ]


def render(result: dict[str, Any]) -> str:
    f: dict[str, Any] = result["figures"]
    c: dict[str, Any] = result["config"]
    lines = [
        f"### Formulary soak ({result['started_at']}, {c['seconds']:g} s, "
        f"{c['clients']} clients, {c['consumers']} consumers, seed {c['seed']}, "
        f"lease {c['lease']:g} s)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| logical submissions (keys) | {f['submissions']:,} |",
        f"| keys answered 202 | {f['accepted']:,} |",
        f"| 202 answers (of them replays) | {f['answers_202']:,} ({f['replays_202']:,}) |",
        f"| 409 answers | {f['answers_409']:,} |",
        f"| 503 answers (retried) | {f['answers_503']:,} |",
        "| connection errors and timeouts (retried) | "
        + (", ".join(f"{k} {v:,}" for k, v in f["retried"].items() if k != "503") or "0")
        + " |",
        f"| formulas stored | {f['stored']:,} |",
        f"| stored though every answer was lost | {f['stored_unanswered']:,} |",
        f"| drained after the load in | {result['settle_seconds']:.2f} s |",
        "",
        "| check | value | result |",
        "|---|---|---|",
    ]
    for v in result["checks"]:
        lines.append(f"| {v['name']} | {v['value']} | {'ok' if v['passed'] else '**FAILED**'} |")
    lines += [
        "",
        "| kill (SIGKILL) | kills | recovered | median s | max s | recovered when |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["recoveries"]:
        median = "-" if r["median_s"] is None else f"{r['median_s']:.2f}"
        most = "-" if r["max_s"] is None else f"{r['max_s']:.2f}"
        lines.append(
            f"| {KIND_TITLES[r['kind']]} | {r['kills']} | {r['recovered']} | {median} | {most} "
            f"| {r['recovered_when']} |"
        )
    failures = [v["name"] for v in result["checks"] if not v["passed"]]
    lines += ["", "Result: " + ("every check holds" if not failures else "FAILED: ")]
    lines[-1] += "; ".join(failures)
    for name, examples in f["examples"].items():
        lines.append(f"- {name}:")
        lines += [f"  - {e}" for e in examples]
    for kill in result["kills"]:
        if kill["seconds"] is None:
            lines.append(f"- {kill['kind']} killed at {kill['at']:.1f} s: {kill['note']}")
    for error in result["harness_errors"]:
        lines.append(f"- harness error: {error}")
    return "\n".join(lines) + "\n"
