"""The soak's chaos: SIGKILLs one process at a time and times each recovery.

``Chaos`` kills the broker, a gunicorn worker or a consumer worker at seeded
random moments, restarts what the harness must restart, and waits until the
stack serves again; ``RECOVERED_WHEN`` says what counts as recovered for each
kind, so the report can say what its times measure.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.soak_clients import Ledger
from bench.soak_config import PAGE, SoakError
from bench.stack import Stack, StartError, request, wait_until
from broker.client import BrokerClient
from broker.interface import PROCESSED, FormulaView

log = logging.getLogger("bench.soak")  # not __name__: the whole soak logs under one name

# Fresh connections that must all answer /health: with 2 gunicorn workers, all 8
# miss a given one 1 time in 256.
PROBES = 8
KINDS = ("broker", "web", "consumer")
RECOVERED_WHEN = {
    "broker": f"GET /health answers 200 on {PROBES} fresh connections in a row",
    "web": f"the arbiter has a new child and GET /health answers 200 on {PROBES} fresh connections",
    "consumer": "a new worker runs and every formula accepted before the kill is processed",
}
FIRST_GAP = (0.5, 1.5)  # seconds before each of the first three kills (one of each kind)
GAP = (1.0, 4.0)  # seconds between later kills
RECOVERY_TIMEOUT = 60.0  # beyond the lease, for consumers


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
