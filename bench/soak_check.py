"""The end of a soak: wait for the drain, read every stored formula back, check.

``check`` holds what the clients saw (``bench.soak_clients``) against what
the service stores and counts each way they disagree in ``Figures`` (lost,
stored twice, answered differently, not processed, ...), with a few
examples of each, so a failed run says what failed.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from bench.soak_clients import REQUEST_TIMEOUT, Submission
from bench.soak_config import PAGE, Config, SoakError
from bench.stack import Stack, StartError, request, wait_until
from broker.admin.__main__ import Unreachable
from broker.admin.__main__ import request as admin_request

SAMPLE_GETS = 200  # listed formulas also read one by one with GET /formulas/{id}
EXAMPLES = 5  # failing keys or ids shown per check


def admin_stats(stack: Stack) -> dict[str, Any]:
    """``python -m broker.admin --json stats``, in process."""
    reply = json.loads(admin_request(stack.settings().admin_socket, "stats", timeout=10.0))
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise SoakError(f"admin stats answered {reply!r}")
    return reply


def settle(stack: Stack, config: Config) -> tuple[dict[str, Any], float, str]:
    """Wait until every process is running and no message is live; (stats, seconds, problem)."""
    problems = []
    if stack.broker is None or not stack.broker.alive():
        problems.append("the broker is not running at the end")
    server, _ = stack.servers["api"]
    if not server.alive():
        problems.append("the gunicorn arbiter is not running at the end")
    alive = sum(w.alive() for w in stack.workers)
    if alive != config.consumers:
        problems.append(f"{alive} consumer workers running at the end, not {config.consumers}")
    if problems:
        return {}, 0.0, "; ".join(problems)

    last: dict[str, Any] = {}

    def drained() -> bool:
        nonlocal last
        try:
            last = admin_stats(stack)
        except Unreachable:
            return False
        return int(last["depth"]) + int(last["in_flight"]) + int(last["delayed"]) == 0

    try:
        seconds = wait_until(
            drained, timeout=config.settle_timeout, what="the queue to drain", interval=0.1
        )
    except StartError as exc:
        return last, config.settle_timeout, str(exc)
    return last, seconds, ""


def get_json(port: int, path: str, *, timeout: float = 30.0) -> tuple[int, Any]:
    """GET ``path``, retrying a 503 or a lost connection until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _, body = request(port, "GET", path, timeout=REQUEST_TIMEOUT)
            if status != 503:
                return status, json.loads(body) if body else None
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise SoakError(f"GET {path} failed for {timeout:.0f} s")
        time.sleep(0.1)  # a backoff between retries, not a wait for something to happen


def read_stored(port: int, expected: int) -> tuple[list[dict[str, Any]], int]:
    """Every stored formula via ``GET /formulas?limit=500`` and its ``next`` cursors."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    most = expected // PAGE + 10  # a listing that goes on longer repeats itself
    while pages < most:
        path = f"/formulas?limit={PAGE}" + (f"&cursor={quote(cursor)}" if cursor else "")
        status, page = get_json(port, path)
        if status != 200:
            raise SoakError(f"GET {path} answered {status}")
        pages += 1
        items += page["items"]
        cursor = page["next"]
        if not cursor:
            return items, pages
    raise SoakError(f"the listing did not end after {most} pages of {PAGE}")


def our_material(item: dict[str, Any]) -> str | None:
    for material in item["materials"]:
        if str(material["name"]).startswith("soak-c"):
            return str(material["name"])
    return None


@dataclass
class Figures:
    submissions: int = 0
    answered: int = 0
    unanswered: int = 0  # no answer but 503s or errors before the deadline
    accepted: int = 0  # keys answered 202
    answers_202: int = 0
    replays_202: int = 0
    answers_409: int = 0
    answers_503: int = 0
    retried: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0  # any other status, a 202/409 naming no id, a 409 to a new make-up
    stored: int = 0
    lost: int = 0
    twice: int = 0
    differently: int = 0
    not_processed: int = 0
    stored_unanswered: int = 0  # stored, though its key's answers were all lost
    foreign: int = 0  # stored formulas no client of this run submitted
    listed_twice: int = 0  # ids the listing showed more than once
    get_mismatches: int = 0  # GET /formulas/{id} disagreeing with the listing
    statuses: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def example(self, check: str, text: str) -> None:
        shown = self.examples.setdefault(check, [])
        if len(shown) < EXAMPLES:
            shown.append(text)


def check(
    submissions: Sequence[Submission],
    items: Sequence[dict[str, Any]],
    get_formula: Callable[[str], dict[str, Any] | None],
) -> Figures:
    """The figures and invariants from what the clients saw and what is stored."""
    f = Figures(submissions=len(submissions), stored=len(items))
    by_id: dict[str, dict[str, Any]] = {}
    by_material: dict[str, list[dict[str, Any]]] = {}
    by_fingerprint: Counter[str] = Counter()
    for item in items:
        if item["id"] in by_id:
            f.listed_twice += 1
            f.example("listed twice", item["id"])
            continue
        by_id[item["id"]] = item
        by_fingerprint[item["fingerprint"]] += 1
        material = our_material(item)
        if material is None:
            f.foreign += 1
            f.example("no client sent", item["id"])
        else:
            by_material.setdefault(material, []).append(item)
        if item["status"] != "processed":
            f.not_processed += 1
            f.example("not processed", f"{item['id']} is {item['status']}")
    for material, stored in by_material.items():
        if len(stored) > 1:
            f.twice += len(stored) - 1
            f.example("stored twice", f"{material}: {[s['id'] for s in stored]}")
    f.twice = max(f.twice, sum(n - 1 for n in by_fingerprint.values()))
    statuses: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    missing: dict[str, dict[str, Any] | None] = {}
    for s in submissions:
        retried.update(s.retried)
        statuses.update(str(a.status) for a in s.answers)
        finals = [a for a in s.answers if a.status in (202, 409)]
        ok_202 = [a for a in finals if a.status == 202]
        f.answers_202 += len(ok_202)
        f.replays_202 += sum(a.replayed for a in ok_202)
        f.answers_409 += len(finals) - len(ok_202)
        f.answers_503 += sum(a.status == 503 for a in s.answers)
        other = [a for a in s.answers if a.status not in (202, 409, 503)]
        stored = by_material.get(s.material, [])
        if other or any(a.formula_id is None for a in finals) or (finals and not ok_202):
            f.unexpected += 1
            f.example("unexpected", _describe(s))
        if not finals:
            if not s.settled and not other:
                f.unanswered += 1
                f.example("unanswered", _describe(s))
            if stored:
                f.stored_unanswered += 1
            continue
        f.answered += 1
        f.accepted += bool(ok_202)
        named = {a.formula_id for a in finals}
        for formula_id in named:
            if formula_id is not None and formula_id not in by_id and formula_id not in missing:
                missing[formula_id] = get_formula(formula_id)
                if missing[formula_id] is not None:
                    f.get_mismatches += 1
                    f.example("GET finds what the listing lacks", formula_id)
        lost = not stored or any(i is None or (i not in by_id and not missing[i]) for i in named)
        if lost:
            f.lost += 1
            f.example("lost", _describe(s))
        stored_ids = {i["id"] for i in stored}
        new_202 = sum(not a.replayed for a in ok_202)
        if (
            len(named) > 1
            or (ok_202 and len(ok_202) < len(finals))
            or new_202 > 1
            or len({a.digest for a in ok_202}) > 1
            or (stored and not named <= stored_ids)
        ):
            f.differently += 1
            f.example("answered differently", _describe(s))
    f.statuses = dict(sorted(statuses.items()))
    f.retried = dict(retried.most_common())
    listed = list(by_id)
    for formula_id in random.Random(0).sample(listed, min(SAMPLE_GETS, len(listed))):
        one = get_formula(formula_id)
        item = by_id[formula_id]
        if one is None or (one["status"], one["fingerprint"]) != (
            item["status"],
            item["fingerprint"],
        ):
            f.get_mismatches += 1
            f.example("GET disagrees with the listing", formula_id)
    return f


def _describe(s: Submission) -> str:
    answers = ", ".join(
        f"{a.status}{' replayed' if a.replayed else ''} {a.formula_id} #{a.digest[:8]}"
        for a in s.answers
    )
    retried = dict(Counter(s.retried))
    return f"key {s.key} ({s.material}): answers [{answers}]; retried {retried}"


def get_formula(port: int) -> Callable[[str], dict[str, Any] | None]:
    def one(formula_id: str) -> dict[str, Any] | None:
        status, body = get_json(port, f"/formulas/{quote(formula_id, safe='')}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise SoakError(f"GET /formulas/{formula_id} answered {status}")
        return body

    return one
