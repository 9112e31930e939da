"""Pipeline figures: how fast workers process, and how long a submit takes to be processed.

* :func:`drain_rate`: K new make-ups are posted over HTTP while the workers are
  paused (SIGSTOP), then the workers resume (SIGCONT) and we time until the
  broker's ``stats().processed`` has grown by K: messages processed per
  second by the default worker count, not limited by how fast we can post.
* :func:`paced_latency`: a paced client submits new make-ups at a steady rate
  (200/s) for a while, workers running; afterwards each formula's
  ``processed_at - created_at`` (both RFC 3339 with milliseconds, the broker's
  clock) gives the submit-to-processed latency.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from bench.load import percentile, unique_body
from bench.stack import Stack, wait_until

log = logging.getLogger(__name__)

SENDERS = 4
_tags = itertools.count(1)


@dataclass
class DrainResult:
    messages: int
    post_seconds: float
    drain_seconds: float

    @property
    def per_second(self) -> float:
        return self.messages / self.drain_seconds if self.drain_seconds > 0 else 0.0


@dataclass
class LatencyResult:
    target_rate: float
    achieved_rate: float
    submitted: int
    non_202: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class _Poster:
    """Keep-alive POSTs of new make-ups from one thread; returns formula ids."""

    def __init__(self, port: int, tag: str) -> None:
        self._port = port
        self._tag = tag
        self._connection: http.client.HTTPConnection | None = None

    def post(self, thread: int, n: int) -> str | None:
        """The new formula's id, or None if the answer was not a 202."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        try:
            self._connection.request(
                "POST",
                "/formulas",
                body=unique_body(self._tag, thread, n),
                headers={"Content-Type": "application/json"},
            )
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        location = response.getheader("Location")
        return location.rsplit("/", 1)[-1] if location and response.status == 202 else None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _post_many(port: int, count: int, *, rate: float | None) -> tuple[list[str], int, float]:
    """Post ``count`` new make-ups (paced at ``rate``/s if given); ids, non-202s, seconds."""
    tag = f"p{next(_tags)}t{time.time_ns() % 10**9}"
    slots = itertools.count()
    lock = threading.Lock()
    ids: list[str] = []
    failures = 0
    started = time.monotonic()

    def send(thread: int) -> None:
        nonlocal failures
        poster = _Poster(port, tag)
        mine: list[str] = []
        bad = 0
        try:
            while (slot := next(slots)) < count:
                if rate is not None:
                    delay = started + slot / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                try:
                    formula_id = poster.post(thread, slot)
                except (OSError, http.client.HTTPException):
                    bad += 1
                    continue
                if formula_id is None:
                    bad += 1
                else:
                    mine.append(formula_id)
        finally:
            poster.close()
            with lock:
                ids.extend(mine)
                failures += bad

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids, failures, time.monotonic() - started


def _wait_processed(stack: Stack, target: int, timeout: float) -> float:
    client = stack.client()
    return wait_until(
        lambda: client.stats().processed >= target,
        timeout=timeout,
        what=f"{target} formulas processed",
        interval=0.005,
    )


def wait_for_workers(stack: Stack, port: int, timeout: float = 60.0) -> None:
    """Submit one formula and wait until a worker has processed it: the workers are up."""
    baseline = stack.client().stats().processed
    ids, failures, _ = _post_many(port, 1, rate=None)
    if failures or not ids:
        raise RuntimeError("could not submit the formula that checks the workers are up")
    _wait_processed(stack, baseline + 1, timeout=timeout)


def drain_rate(stack: Stack, port: int, count: int) -> DrainResult:
    """Post ``count`` formulas with the workers paused, then time the workers' drain."""
    baseline = stack.client().stats().processed
    for worker in stack.workers:
        worker.signal(signal.SIGSTOP)
    try:
        ids, failures, post_seconds = _post_many(port, count, rate=None)
    finally:
        started = time.monotonic()
        for worker in stack.workers:
            worker.signal(signal.SIGCONT)
    if failures:
        log.warning("!!! %d of %d posts for the drain were not 202", failures, count)
    _wait_processed(stack, baseline + len(ids), timeout=600)
    drain_seconds = time.monotonic() - started
    log.info(
        "drain: %d messages processed in %.2fs (%.0f/s)",
        len(ids),
        drain_seconds,
        len(ids) / drain_seconds,
    )
    return DrainResult(len(ids), post_seconds, drain_seconds)


def _ms(moment: str) -> float:
    return datetime.fromisoformat(moment).timestamp() * 1000


def paced_latency(stack: Stack, port: int, rate: float, seconds: float) -> LatencyResult:
    """Submit at ``rate``/s for ``seconds`` with workers running; submit-to-processed latency."""
    client = stack.client()
    baseline = client.stats().processed
    count = max(1, round(rate * seconds))
    ids, failures, elapsed = _post_many(port, count, rate=rate)
    if failures:
        log.warning("!!! %d of %d paced submits were not 202", failures, count)
    _wait_processed(stack, baseline + len(ids), timeout=120)
    latencies: list[float] = []
    for formula_id in ids:
        view = client.get_formula(formula_id)
        if view.processed_at is not None:
            latencies.append(_ms(view.processed_at) - _ms(view.created_at))
    latencies.sort()
    return LatencyResult(
        target_rate=rate,
        achieved_rate=len(ids) / elapsed if elapsed > 0 else 0.0,
        submitted=len(ids),
        non_202=failures,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
    )
