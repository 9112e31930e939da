"""What every engine does the same way: new ids, and a handler's summary as JSON text."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import simplejson

from broker.errors import InvalidCursor

__all__ = [
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
