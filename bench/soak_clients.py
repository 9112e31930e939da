"""What the soak's clients do and saw: every logical submission, its answers and retries.

Each ``Client`` thread submits new make-ups with one ``Idempotency-Key`` per
logical submission and retries the same body with the same key through
503s, lost connections and timeouts; the ``Ledger`` keeps every outcome so
the checks (``bench.soak_check``) can hold it against what is stored.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

REQUEST_TIMEOUT = 10.0
BACKOFF_BASE = 0.02
BACKOFF_CAP = 1.0


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
