"""Long polling across hosts: one LISTEN connection per broker, waking its waiting receives.

A submit, a nack without delay and a redrive ``NOTIFY formulary_messages``
in their transaction; PostgreSQL delivers the notification when that
transaction commits, to every broker listening, on every host. This module's
thread listens on a connection of its own (``notifies()`` holds the
connection while it waits, so a pooled one would be lost to the pool) and
bumps a generation number that waiting receives sleep on.

A notification can be lost (the listener reconnecting after the database
restarted, say), so a waiter never sleeps longer than ``RECHECK_SECONDS``
without looking at the queue itself: a lost notification delays a delivery,
it never strands one. The listener also runs the engine's housekeeping
(``on_tick``) about once a second.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import psycopg

log = logging.getLogger(__name__)

CHANNEL: Final = "formulary_messages"
RECHECK_SECONDS: Final = 1.0
"""Longest a waiting receive sleeps without looking at the queue itself."""
RECONNECT_SECONDS: Final = (0.1, 0.5, 1.0, 2.0)


class Wakeups:
    """A generation number that changes whenever another broker may have made work visible."""

    def __init__(self, conninfo: str, on_tick: Callable[[], None] = lambda: None) -> None:
        self._conninfo = conninfo
        self._on_tick = on_tick
        self._changed = threading.Condition()
        self._generation = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="pg-listener", daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        with self._changed:
            return self._generation

    def bump(self) -> None:
        """Wake every waiter (this broker made work visible, or may have missed a notice)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the generation moves past ``seen``, at most ``timeout`` seconds."""
        deadline = time.monotonic() + min(timeout, RECHECK_SECONDS)
        with self._changed:
            while self._generation == seen and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(remaining)

    def close(self, nudge: Callable[[], None] = lambda: None) -> None:
        """Stop listening; ``nudge`` sends a notice so the listener need not wait out its tick."""
        self._stopping.set()
        self.bump()
        with contextlib.suppress(Exception):
            nudge()
        self._thread.join(RECHECK_SECONDS + 5)

    def _listen(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, application_name="formulary-listener"
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.info("listening for new messages again")
                    failures = 0
                    # Anything sent while we were not listening is lost: look again.
                    self.bump()
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=RECHECK_SECONDS, stop_after=1):
                            self.bump()
                        self._tick()
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                delay = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
                if failures == 0:
                    log.warning("lost the listening connection (%s); reconnecting", exc)
                failures += 1
                self._stopping.wait(delay)

    def _tick(self) -> None:
        try:
            self._on_tick()
        except Exception as exc:  # housekeeping must never stop the listener
            log.warning("housekeeping failed: %r", exc)
