"""The soak, short: 30 s of submits while the broker, a gunicorn worker and consumers are killed.

``python -m bench.soak --seconds 30`` end to end, as CI runs it, on each engine. Its first
three kills are one of each kind, so 30 s covers every kind; it exits 0 only
if nothing answered is lost, nothing is stored twice, no key is answered two
ways and every formula is processed. The table is read back to make sure the
run measured what it says, and the checker itself is shown each kind of
failure first (a zero from a check that cannot count proves nothing).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.soak_check import check
from bench.soak_clients import Answer, Submission

ROOT = Path(__file__).resolve().parent.parent
MUST_BE_ZERO = (
    "formulas lost",
    "stored twice",
    "keys answered differently",
    "formulas not processed",
)
KILL_ROWS = {
    "broker": "| broker (restarted on its journal) |",
    "web": "| gunicorn worker (arbiter replaces it) |",
    "consumer": "| consumer worker (restarted) |",
}


def stored(formula_id: str, material: str, status: str = "processed") -> dict[str, Any]:
    return {
        "id": formula_id,
        "fingerprint": f"fp-{material}",
        "status": status,
        "materials": [{"name": material, "concentration": "1.5"}, {"name": "soak base"}],
    }


def accepted(formula_id: str, replayed: bool = False, digest: str = "body") -> Answer:
    return Answer(202, formula_id, replayed, digest)


def submission(material: str, *answers: Answer, settled: bool = True) -> Submission:
    return Submission(f"key-{material}", material, list(answers), settled=settled)


def checked(submissions: list[Submission], items: list[dict[str, Any]]) -> dict[str, int]:
    by_id = {item["id"]: item for item in items}
    figures = check(submissions, items, by_id.get)
    return {name: getattr(figures, name) for name in COUNTS}


COUNTS = ("lost", "twice", "differently", "not_processed", "unanswered", "unexpected")
CLEAN = dict.fromkeys(COUNTS, 0)


def test_the_checker_passes_a_key_answered_once_then_replayed_byte_for_byte() -> None:
    subs = [submission("soak-c0-1", accepted("a"), accepted("a", replayed=True))]
    assert checked(subs, [stored("a", "soak-c0-1")]) == CLEAN


def test_the_checker_counts_an_accepted_formula_that_is_not_stored_as_lost() -> None:
    subs = [submission("soak-c0-1", accepted("a")), submission("soak-c0-2", accepted("b"))]
    assert checked(subs, [stored("b", "soak-c0-2")]) == {**CLEAN, "lost": 1}


def test_the_checker_counts_a_make_up_stored_under_two_ids_as_stored_twice() -> None:
    subs = [submission("soak-c0-1", accepted("a"))]
    items = [stored("a", "soak-c0-1"), stored("b", "soak-c0-1")]
    assert checked(subs, items)["twice"] == 1


@pytest.mark.parametrize(
    "answers",
    [
        (accepted("a"), accepted("b", replayed=True)),  # two ids
        (accepted("a"), accepted("a")),  # two new 202s
        (accepted("a"), accepted("a", replayed=True, digest="other")),  # replay not the same bytes
        (accepted("a"), Answer(409, "a", False, "conflict")),  # 202 then 409
    ],
)
def test_the_checker_counts_a_key_answered_two_ways(answers: tuple[Answer, ...]) -> None:
    items = [stored("a", "soak-c0-1"), stored("b", "soak-c9-9")]
    assert checked([submission("soak-c0-1", *answers)], items)["differently"] == 1


def test_the_checker_counts_queued_and_failed_formulas_as_not_processed() -> None:
    subs = [submission("soak-c0-1", accepted("a")), submission("soak-c0-2", accepted("b"))]
    items = [stored("a", "soak-c0-1", "queued"), stored("b", "soak-c0-2", "failed")]
    assert checked(subs, items) == {**CLEAN, "not_processed": 2}


def test_the_checker_counts_a_key_with_only_503s_by_its_deadline_as_unanswered() -> None:
    unavailable = Answer(503, None, False, "busy")
    subs = [submission("soak-c0-1", unavailable, unavailable, settled=False)]
    assert checked(subs, []) == {**CLEAN, "unanswered": 1}


def test_the_checker_counts_a_409_to_a_new_make_up_and_other_statuses_as_unexpected() -> None:
    subs = [
        submission("soak-c0-1", Answer(409, "a", False, "conflict")),
        submission("soak-c0-2", Answer(500, None, False, "oops")),
    ]
    assert checked(subs, [stored("a", "soak-c0-1")])["unexpected"] == 2


def row_value(table: str, name: str) -> str:
    found = re.search(rf"^\| {re.escape(name)} \| ([^|]*) \|", table, re.MULTILINE)
    assert found, f"no row {name!r} in:\n{table}"
    return found.group(1).strip()


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["embedded", "postgres"])
def test_a_30_second_soak_loses_nothing_stores_nothing_twice_and_recovers_from_each_kill(
    tmp_path: Path, engine: str
) -> None:
    # On PostgreSQL the broker is SIGKILLed under the same keyed load, with its groups of keyed
    # submits on the one-INSERT path: the same checks must hold.
    out = tmp_path / "soak.json"
    options = ["--seconds", "30", "--clients", "4", "--engine", engine, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-6000:]}"
    table = done.stdout
    for name in MUST_BE_ZERO:
        assert row_value(table, name) == "0", table
    assert int(row_value(table, "logical submissions (keys)").replace(",", "")) > 0, table
    assert int(row_value(table, "keys answered 202").replace(",", "")) > 0, table
    for kind, row in KILL_ROWS.items():
        line = next((x for x in table.splitlines() if x.startswith(row)), None)
        assert line is not None, f"no {kind} row in:\n{table}"
        kills, recovered = (int(cell) for cell in line.split("|")[2:4])
        assert kills >= 1 and recovered == kills, line
    figures = json.loads(out.read_text())
    assert all(check["passed"] for check in figures["checks"]), figures["checks"]
