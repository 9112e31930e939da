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
import hashlib
import http.client
import json
import logging
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.report import machine
from bench.stack import ROOT, Stack, StartError, request, start_command, wait_until
from broker.admin.__main__ import Unreachable
from broker.admin.__main__ import request as admin_request
from broker.client import BrokerClient
from broker.interface import PROCESSED, FormulaView

log = logging.getLogger("bench.soak")

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed: the table says which
EXIT_ERROR = 2  # the soak could not run (a process did not start, a harness bug)
EXIT_INTERRUPTED = 130

# Fresh connections that must all answer /health: with 2 gunicorn workers, all 8
# miss a given one 1 time in 256.
PROBES = 8
KINDS = ("broker", "web", "consumer")
KIND_TITLES = {
    "broker": "broker (restarted on its journal)",
    "web": "gunicorn worker (arbiter replaces it)",
    "consumer": "consumer worker (restarted)",
}
RECOVERED_WHEN = {
    "broker": f"GET /health answers 200 on {PROBES} fresh connections in a row",
    "web": f"the arbiter has a new child and GET /health answers 200 on {PROBES} fresh connections",
    "consumer": "a new worker runs and every formula accepted before the kill is processed",
}

PAGE = 500
REQUEST_TIMEOUT = 10.0
BACKOFF_BASE = 0.02
BACKOFF_CAP = 1.0
FIRST_GAP = (0.5, 1.5)  # seconds before each of the first three kills (one of each kind)
GAP = (1.0, 4.0)  # seconds between later kills
RECOVERY_TIMEOUT = 60.0  # beyond the lease, for consumers
SAMPLE_GETS = 200  # listed formulas also read one by one with GET /formulas/{id}
EXAMPLES = 5  # failing keys or ids shown per check


class SoakError(RuntimeError):
    """The soak cannot carry on (the stack is broken beyond what it measures)."""


@dataclass(frozen=True)
class Config:
    seconds: float
    clients: int
    consumers: int
    seed: int
    lease: float
    submit_deadline: float
    settle_timeout: float
    out: Path
    keep_logs: bool


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
    )


# -- what the clients saw ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    formula_id: str | None  # a 202's ``id``, a 409's ``existing_id``
    replayed: bool  # ``Idempotent-Replayed: true``
    digest: str  # of the body: a key's 202s must be the same bytes


@dataclass(slots=True)
class Submission:
    """One logical submission: one make-up, one key, every attempt's outcome."""

    key: str
    material: str
    answers: list[Answer] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # why each retry happened
    settled: bool = False  # got an answer other than 503 before its deadline


class Ledger:
    """Every submission of every client, and the formula ids accepted so far in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submissions: list[Submission] = []
        self._accepted: list[str] = []
        self.errors: list[str] = []  # harness failures (tracebacks), never the system's

    def add(self, submission: Submission) -> None:
        with self._lock:
            self.submissions.append(submission)

    def accepted(self, formula_id: str) -> None:
        with self._lock:
            self._accepted.append(formula_id)

    def accepted_count(self) -> int:
        with self._lock:
            return len(self._accepted)

    def accepted_ids(self, start: int, stop: int) -> list[str]:
        with self._lock:
            return self._accepted[start:stop]

    def error(self, where: str) -> None:
        with self._lock:
            self.errors.append(f"{where}:\n{traceback.format_exc()}")


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "disconnected"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class Client:
    """Submits new make-ups one after another on a keep-alive connection until told to stop."""

    def __init__(
        self,
        index: int,
        port: int,
        ledger: Ledger,
        *,
        load_stop: threading.Event,
        abort: threading.Event,
        submit_deadline: float,
        rng: random.Random,
    ) -> None:
        self.index = index
        self.port = port
        self.ledger = ledger
        self.load_stop = load_stop
        self.abort = abort
        self.submit_deadline = submit_deadline
        self.rng = rng
        self._connection: http.client.HTTPConnection | None = None

    def run(self) -> None:
        try:
            number = 0
            while not self.load_stop.is_set() and not self.abort.is_set():
                number += 1
                material = f"soak-c{self.index}-{number}"
                submission = Submission(uuid.uuid4().hex, material)
                self.ledger.add(submission)
                self.submit(submission)
        except Exception:
            self.ledger.error(f"client {self.index}")
        finally:
            self._close()

    def submit(self, submission: Submission) -> None:
        """Retry the same body with the same key until an answer other than 503, or the deadline."""
        body = json.dumps(
            {
                "name": f"Soak {submission.material}",
                "materials": [
                    {"name": submission.material, "concentration": 1.5},
                    {"name": "soak base", "concentration": 10},
                ],
            }
        ).encode()
        deadline = time.monotonic() + self.submit_deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = self._post(body, submission.key)
            except (OSError, http.client.HTTPException) as exc:
                submission.retried.append(error_kind(exc))
            else:
                first_accept = answer.status == 202 and not any(
                    a.status == 202 for a in submission.answers
                )
                submission.answers.append(answer)
                if first_accept and answer.formula_id is not None:
                    self.ledger.accepted(answer.formula_id)
                if answer.status != 503:
                    submission.settled = True
                    return
                submission.retried.append("503")
            delay = self.rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            if time.monotonic() + delay > deadline or self.abort.wait(delay):
                return

    def _post(self, body: bytes, key: str) -> Answer:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT
            )
        try:
            self._connection.request(
                "POST",
                "/formulas",
                body=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
            )
            response = self._connection.getresponse()
            data = response.read()
        except BaseException:
            self._close()
            raise
        if response.will_close:
            self._close()
        return Answer(
            response.status,
            _named_id(response.status, data),
            response.getheader("Idempotent-Replayed") == "true",
            hashlib.sha256(data).hexdigest()[:16],
        )

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _named_id(status: int, data: bytes) -> str | None:
    name = {202: "id", 409: "existing_id"}.get(status)
    if name is None:
        return None
    try:
        value = json.loads(data).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# -- chaos ---------------------------------------------------------------------------------


@dataclass
class Kill:
    kind: str
    at: float  # seconds since the load started
    victim: int  # pid
    seconds: float | None = None  # until recovered; None if it did not recover in time
    note: str = ""


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``, from ``/proc/*/stat``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        state, parent = fields[0], int(fields[1])
        if parent == pid and state != "Z":
            found.append(int(entry))
    return sorted(found)


def healthy(port: int) -> bool:
    """``GET /health`` answers 200 on ``PROBES`` fresh connections in a row.

    Each new connection lands on a gunicorn worker chosen by the kernel
    (``SO_REUSEPORT`` hashes the source port), so a run of them reaches every
    worker with near certainty: a worker still booting holds its requests
    until it serves them, one without a broker answers 503.
    """
    return all(request(port, "GET", "/health", timeout=2.0)[0] == 200 for _ in range(PROBES))


class ProcessedTracker:
    """Whether every formula accepted up to some point is processed, asked in batches."""

    def __init__(self, ledger: Ledger, client: BrokerClient) -> None:
        self._ledger = ledger
        self._client = client
        self._checked = 0  # accepted ids already moved to _pending
        self._pending: list[str] = []

    def processed_up_to(self, count: int) -> bool:
        if count > self._checked:
            self._pending += self._ledger.accepted_ids(self._checked, count)
            self._checked = count
        still: list[str] = []
        for start in range(0, len(self._pending), PAGE):
            batch = self._pending[start : start + PAGE]
            views: list[FormulaView | None] = self._client.get_formulas(batch)
            still += [
                i for i, v in zip(batch, views, strict=True) if v is None or v.status != PROCESSED
            ]
        self._pending = still
        return not still

    def close(self) -> None:
        self._client.close()


class Chaos:
    """Kills one process at a time at seeded random moments, waiting out each recovery.

    It runs on the main thread because it starts processes: a child gets
    SIGTERM when the thread that started it ends (``PR_SET_PDEATHSIG`` is
    per thread), so a broker restarted from a short-lived thread would stop
    with that thread.
    """

    def __init__(
        self,
        stack: Stack,
        port: int,
        ledger: Ledger,
        rng: random.Random,
        *,
        started: float,
        lease: float,
    ) -> None:
        self.stack = stack
        self.port = port
        self.ledger = ledger
        self.rng = rng
        self.started = started
        self.lease = lease
        self.kills: list[Kill] = []
        self._tracker = ProcessedTracker(ledger, BrokerClient(stack.settings()))

    def run(self, seconds: float) -> None:
        """Kill until ``seconds`` after the start, each kind at least once, the first three
        kills one of each kind; stop early if a process does not recover."""
        first = self.rng.sample(KINDS, len(KINDS))
        end = self.started + seconds
        while True:
            gap = self.rng.uniform(*(FIRST_GAP if first else GAP))
            if not first and time.monotonic() + gap >= end:
                break
            time.sleep(gap)  # the pause between kills, chosen by the seeded RNG
            kind = first.pop(0) if first else self.rng.choice(KINDS)
            kill = self.kill(kind)
            self.kills.append(kill)
            if kill.seconds is None:
                log.error("%s did not recover: %s", kind, kill.note)
                return
            log.info("killed %s (pid %d): recovered in %.2f s", kind, kill.victim, kill.seconds)
        time.sleep(max(0.0, end - time.monotonic()))  # the rest of the load time

    def kill(self, kind: str) -> Kill:
        """Kill one process of ``kind``, restart what needs restarting, time the recovery."""
        kill = Kill(kind, 0.0, 0)
        kill_one = {"broker": self._broker, "web": self._web, "consumer": self._consumer}[kind]
        timeout = RECOVERY_TIMEOUT + (self.lease if kind == "consumer" else 0.0)
        try:
            recovered, what = kill_one(kill)
            wait_until(recovered, timeout=timeout, what=what, interval=0.02)
        except (StartError, SoakError) as exc:
            kill.note = str(exc)
            return kill
        kill.seconds = time.monotonic() - (self.started + kill.at)
        return kill

    # Each kills its victim (noting pid and moment in ``kill``), restarts what the
    # harness must restart, and returns the recovery condition and its description.

    def _sigkill(self, kill: Kill, pid: int) -> None:
        kill.victim = pid
        kill.at = time.monotonic() - self.started
        os.kill(pid, signal.SIGKILL)

    def _broker(self, kill: Kill) -> tuple[Callable[[], bool], str]:
        broker = self.stack.broker
        if broker is None or broker.popen is None:
            raise SoakError("no broker to kill")
        self._sigkill(kill, broker.pid)
        broker.popen.wait(timeout=10)
        self.stack.start_broker()  # on the same journal; returns once it answers ping
        return (lambda: healthy(self.port)), "GET /health to answer 200 after a broker restart"

    def _web(self, kill: Kill) -> tuple[Callable[[], bool], str]:
        server, _ = self.stack.servers["api"]
        before = set(children(server.pid))
        if not before:
            raise SoakError("the gunicorn arbiter has no workers to kill")
        victim = self.rng.choice(sorted(before))
        self._sigkill(kill, victim)

        def recovered() -> bool:
            server.check_alive()
            now = set(children(server.pid))
            replaced = victim not in now and len(now) >= len(before) and bool(now - before)
            return replaced and healthy(self.port)

        return recovered, f"the arbiter to replace worker {victim} and GET /health to answer 200"

    def _consumer(self, kill: Kill) -> tuple[Callable[[], bool], str]:
        alive = [w for w in self.stack.workers if w.alive()]
        if not alive:
            raise SoakError("no consumer worker to kill")
        victim = self.rng.choice(alive)
        accepted = self.ledger.accepted_count()
        self._sigkill(kill, victim.pid)
        if victim.popen is not None:
            victim.popen.wait(timeout=10)
        self.stack.start_workers(1)
        replacement = self.stack.workers[-1]

        def recovered() -> bool:
            replacement.check_alive()
            return self._tracker.processed_up_to(accepted)

        return recovered, f"the {accepted} formulas accepted before the kill to be processed"

    def close(self) -> None:
        self._tracker.close()


# -- the end: drain, read back, check --------------------------------------------------------


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


# -- the report ----------------------------------------------------------------------------


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


# -- the run -------------------------------------------------------------------------------


class SoakStack(Stack):
    """The bench stack with a shorter lease, so a killed consumer's messages return sooner."""

    def __init__(self, lease: float) -> None:
        super().__init__("soak")
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
    with SoakStack(config.lease) as stack:
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
