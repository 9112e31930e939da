"""The consume loop: receive a batch, run the handler on each message, complete or nack.

``Consumer.run_once()`` is one turn of the loop, so tests drive it step by
step; ``Consumer.run()`` turns it until ``stop()`` is called. ``Heartbeat``
extends the leases of the messages a consumer holds while a slow handler
runs, so a healthy worker never loses its lease.

Failures. A handler exception nacks the message with a capped exponential
backoff with full jitter (the n-th failure waits a random time in
``[0, min(cap, base * 2**(n-1))]``), so a struggling dependency is not
hammered in lock-step. The broker dead-letters the message after
``max_deliveries``. A lost broker connection is waited out the same way.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from broker.errors import BrokerUnavailable, FormularyError, StaleReceipt
from broker.interface import (
    INVALID_SUMMARY,
    STALE,
    ConsumerBroker,
    Delivery,
    FormulaView,
)
from worker.handlers import Handler

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


class Held:
    """The leases a consumer holds right now, with when each was last renewed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._renewed: dict[str, float] = {}

    def add(self, receipt: str, now: float) -> None:
        with self._lock:
            self._renewed[receipt] = now

    def remove(self, receipt: str) -> None:
        with self._lock:
            self._renewed.pop(receipt, None)

    def renewed(self, receipt: str, now: float) -> None:
        with self._lock:
            if receipt in self._renewed:
                self._renewed[receipt] = now

    def due(self, before: float) -> list[str]:
        with self._lock:
            return [r for r, at in self._renewed.items() if at <= before]

    def all(self) -> list[str]:
        with self._lock:
            return list(self._renewed)


class Consumer:
    def __init__(
        self,
        broker: ConsumerBroker,
        handler: Handler,
        *,
        name: str,
        batch_size: int = 10,
        visibility_timeout: float = 30.0,
        wait_seconds: float = 1.0,
        backoff: Backoff = Backoff(),
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.broker = broker
        self.handler = handler
        self.name = name
        self.batch_size = batch_size
        self.visibility_timeout = visibility_timeout
        self.wait_seconds = wait_seconds
        self.backoff = backoff
        self.held = Held()
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._unavailable = 0

    def stop(self) -> None:
        """Finish the message in hand, release the rest of the batch, receive no more."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                self._unavailable = 0
            except BrokerUnavailable as exc:
                self._unavailable += 1
                delay = self.backoff.delay(self._unavailable, self._rng)
                log.warning(
                    "%s: broker unavailable (%s); retrying in %.1fs", self.name, exc.reason, delay
                )
                self._stop.wait(delay)
            except Exception:
                # A bug must not kill the thread silently: the leases it held
                # run out and the messages come back.
                self._unavailable += 1
                delay = self.backoff.delay(self._unavailable, self._rng)
                log.exception("%s: unexpected error; carrying on in %.1fs", self.name, delay)
                self._stop.wait(delay)
        self.release_all()

    def run_once(self, now: float | None = None) -> int:
        """Receive one batch and handle it; returns how many messages the handler ran on.

        Three round trips a batch, not two a message: the formulas are read
        together, and the results are recorded and acked together (one
        durable write) once the batch is done or the consumer is stopping.
        """
        if self._stop.is_set():
            return 0
        deliveries = self.broker.receive(
            self.name, self.batch_size, self.visibility_timeout, self.wait_seconds
        )
        if not deliveries:
            return 0
        received_at = self._clock() if now is None else now
        for delivery in deliveries:
            self.held.add(delivery.receipt, received_at)
        done: list[tuple[Delivery, Mapping[str, Any]]] = []
        handled = 0
        try:
            formulas = self.broker.get_formulas([d.formula_id for d in deliveries])
            for delivery, formula in zip(deliveries, formulas, strict=True):
                if self._stop.is_set():
                    break
                summary = self.handle(delivery, formula)
                handled += 1
                if summary is not None:
                    done.append((delivery, summary))
        finally:
            try:
                self.complete(done)
            finally:
                self.release_all()
        return handled

    def handle(self, delivery: Delivery, formula: FormulaView | None) -> Mapping[str, Any] | None:
        """The handler's summary for one message; on failure, nack it for a retry."""
        try:
            if formula is None:
                raise LookupError(f"formula {delivery.formula_id} is not stored")
            return self.handler(formula)
        except Exception:
            delay = self.backoff.delay(delivery.delivery, self._rng)
            log.exception(
                "%s: handler failed on message %s (delivery %d); retry in %.1fs",
                self.name,
                delivery.message_id,
                delivery.delivery,
                delay,
            )
            self._settle(delivery.receipt, lambda: self.broker.nack(delivery.receipt, delay))
            return None

    def complete(self, done: list[tuple[Delivery, Mapping[str, Any]]]) -> None:
        """Record and ack a batch's results in one call."""
        if not done:
            return
        try:
            outcomes = self.broker.complete_many([(d.receipt, summary) for d, summary in done])
        finally:
            for delivery, _ in done:
                self.held.remove(delivery.receipt)
        for (delivery, _), outcome in zip(done, outcomes, strict=True):
            if outcome == STALE:
                log.warning(
                    "%s: the lease on %s ran out before its result was recorded",
                    self.name,
                    delivery.message_id,
                )
            elif outcome == INVALID_SUMMARY:
                log.error(
                    "%s: the handler's summary for %s cannot be stored as JSON; "
                    "the message will be retried",
                    self.name,
                    delivery.message_id,
                )

    def release_all(self) -> None:
        """Hand back every message still held, for another consumer to take at once.

        Best effort: if the broker is gone, the leases simply run out.
        """
        for receipt in self.held.all():
            try:
                self._settle(receipt, partial(self.broker.nack, receipt, 0.0))
            except BrokerUnavailable:
                continue

    def _settle(self, receipt: str, call: Callable[[], object]) -> None:
        try:
            call()
        except StaleReceipt:
            log.warning("%s: the lease %s ran out before we settled it", self.name, receipt)
        except BrokerUnavailable:
            raise
        except FormularyError as exc:
            log.error("%s: could not settle %s: %r", self.name, receipt, exc)
        finally:
            self.held.remove(receipt)


class Heartbeat:
    """Renews the leases a consumer holds once a third of the lease has passed."""

    def __init__(self, consumer: Consumer, *, clock: Clock = time.monotonic) -> None:
        self.consumer = consumer
        self._clock = clock
        self.interval = consumer.visibility_timeout / 3

    def beat(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        renewed = 0
        for receipt in self.consumer.held.due(now - self.interval):
            try:
                self.consumer.broker.extend(receipt, self.consumer.visibility_timeout)
            except (StaleReceipt, BrokerUnavailable) as exc:
                log.warning("heartbeat could not extend %s: %r", receipt, exc)
                continue
            self.consumer.held.renewed(receipt, now)
            renewed += 1
        return renewed

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval / 2):
            self.beat()
