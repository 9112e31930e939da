"""What every engine does the same way.

New ids, a handler's summary as JSON text, listing cursors, the token
buckets of ``FORMULARY_RATE_LIMIT``, and :class:`EngineCalls`: the broker
calls that both engines answer alike, over the engine's own batch calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import simplejson

from broker.errors import FormulaNotFound, InvalidCursor, InvalidSummary, StaleReceipt
from broker.formula import FormulaDraft
from broker.interface import (
    COMPLETED,
    INVALID_SUMMARY,
    MAX_PAGE,
    STALE,
    Delivery,
    FormulaPage,
    FormulaView,
    IdempotencyKey,
    Submission,
    SubmitOutcome,
    SubmitRequest,
    unwrap,
)

__all__ = [
    "MAX_BATCH",
    "MAX_WAIT_SECONDS",
    "EngineCalls",
    "TokenBuckets",
    "decode_cursor",
    "encode_cursor",
    "new_id",
    "pack_summary",
    "unpack_summary",
]


def new_id() -> str:
    """Opaque, unguessable, URL-safe: 128 random bits in 22 characters."""
    return secrets.token_urlsafe(16)


def pack_summary(summary: Mapping[str, Any]) -> str:
    """A handler's summary as compact JSON; ``Decimal`` figures keep their exact digits.

    Raises ``TypeError`` or ``ValueError`` for anything JSON cannot hold.
    """
    text: str = _SUMMARY_ENCODER.encode(dict(summary))
    return text


def unpack_summary(text: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return summary


_SUMMARY_ENCODER = simplejson.JSONEncoder(use_decimal=True, separators=(",", ":"), allow_nan=False)


def encode_cursor(position: int) -> str:
    """A listing cursor: an opaque spelling of the last listed formula's position."""
    return base64.urlsafe_b64encode(f"s{position}".encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> int:
    """The position ``cursor`` spells; ``InvalidCursor`` if ``encode_cursor`` never made it."""
    if len(cursor) > _MAX_CURSOR:
        raise InvalidCursor(cursor[:_MAX_CURSOR])
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        text = raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(cursor) from None
    if not text.startswith("s") or not text[1:].isdigit():
        raise InvalidCursor(cursor)
    position = int(text[1:])
    if position < 1 or encode_cursor(position) != cursor:
        raise InvalidCursor(cursor)
    return position


# Far longer than any position can reach: refusing longer ones keeps int()
# off arbitrarily long digit strings.
_MAX_CURSOR = 32


class TokenBuckets:
    """``FORMULARY_RATE_LIMIT`` for each API key: ``rate`` per second, bursts of ``rate``.

    One bucket per key, in this process's memory, behind its own lock (the
    engines call it outside theirs). Cost O(1) per request; a bucket that
    has refilled completely is as good as absent, so ``spend`` forgets full
    buckets when it finds more than ``MAX_IDLE`` of them.
    """

    MAX_IDLE = 10_000

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self._rate = rate
        self._burst = max(1.0, rate)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def spend(self, key: str) -> float:
        """0.0 and one token spent if ``key`` has one; else seconds until it will."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self._rate
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_IDLE:
                self._forget_full(now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rate >= self._burst
        ]
        for key in full:
            del self._buckets[key]


MAX_BATCH: Final = 100
"""Most messages one ``receive`` leases."""
MAX_WAIT_SECONDS: Final = 60.0
"""Longest one ``receive`` waits for a message."""


class EngineCalls(ABC):
    """The broker calls both engines answer alike, each over one of the engine's own.

    ``submit``, ``complete`` and ``get_formula`` are the batch call for one
    item; ``receive`` and ``list_formulas`` check or bound their arguments,
    then call the engine's ``_receive`` and ``_page``; ``rate_limit`` spends
    from ``_buckets`` (None: no limit).
    """

    _buckets: TokenBuckets | None

    @abstractmethod
    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]: ...

    @abstractmethod
    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]: ...

    @abstractmethod
    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]: ...

    @abstractmethod
    def _page(self, limit: int, cursor: str | None) -> FormulaPage:
        """Up to ``limit`` formulas (1 to ``MAX_PAGE``), newest first, after ``cursor``."""

    @abstractmethod
    def _receive(
        self, consumer: str, max_messages: int, visibility_timeout: float | None, wait: float
    ) -> list[Delivery]:
        """Lease up to ``max_messages`` (1 to ``MAX_BATCH``), waiting up to ``wait`` seconds."""

    def rate_limit(self, key_id: str) -> float:
        return 0.0 if self._buckets is None else self._buckets.spend(key_id)

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        [outcome] = self.submit_many([(draft, idempotency)])
        return unwrap(outcome)

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        return self._page(limit, cursor)

    def get_formula(self, formula_id: str) -> FormulaView:
        [found] = self.get_formulas([formula_id])
        if found is None:
            raise FormulaNotFound(formula_id)
        return found

    # The signature repeats the Protocol's (broker.interface.ConsumerBroker.receive):
    # this is its one implementation, for both engines.
    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        max_messages = max(1, min(int(max_messages), MAX_BATCH))
        wait_seconds = max(0.0, min(float(wait_seconds), MAX_WAIT_SECONDS))
        return self._receive(consumer, max_messages, visibility_timeout, wait_seconds)

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        [outcome] = self.complete_many([(receipt, summary)])
        if outcome == STALE:
            raise StaleReceipt(receipt)
        if outcome == INVALID_SUMMARY:
            raise InvalidSummary("JSON cannot hold this summary")
        return outcome == COMPLETED
