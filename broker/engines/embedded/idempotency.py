"""Idempotency keys: which answer a key got first, kept for a while.

A key's record holds only what rebuilds that answer exactly: the formula it
names (the one stored, or for a 409 the one that was there already) and
whether it was a duplicate. Formulas are never deleted and keep their name,
materials, ids and ``created_at``, so the engine rebuilds the 202's body
byte for byte from the stored formula as it stood when submitted (see
``EmbeddedBroker``); the record costs about a third of what the formula
does, and nothing of the answer is stored twice.

A key belongs to its owner, the API key that sent it (``""`` with
``FORMULARY_AUTH=off``): keys are looked up by (owner, key), so the same
string from two owners is two independent keys.

Every key lives for the same ``ttl``, so keys expire in the order they were
recorded: a deque in that order lets ``expire`` drop the old ones from the
front in O(expired), never scanning the live keys. ``get`` and ``put`` are O(1).

Each key is kept as a plain tuple of strings and numbers, which the garbage
collector stops tracking, for the reason ``store`` gives: a day's keys would
otherwise be walked by every full collection.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, cast


class Remembered(NamedTuple):
    """One key's first answer: the formula it named, and whether it was a 409."""

    key: str
    body_digest: str
    formula_id: str
    duplicate: bool
    expires_at: float  # wall-clock seconds
    owner: str = ""
    """The id of the API key that sent it; ``""`` with ``FORMULARY_AUTH=off``."""


_Row = tuple[str, str, str, bool, float, str]
"""A ``Remembered``'s fields as the plain tuple kept (the collector untracks only those)."""


class IdempotencyKeys:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # Keys by owner, then by key: one dict per owner (an API key, or "")
        # rather than an (owner, key) tuple per key, which cost 56 B a key.
        self._by_owner: dict[str, dict[str, _Row]] = {}
        self._order: deque[_Row] = deque()

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._by_owner.values())

    def get(self, owner: str, key: str, now: float) -> Remembered | None:
        """The live answer for ``owner``'s ``key``; an expired one counts as none."""
        row = self._by_owner.get(owner, {}).get(key)
        if row is None:
            return None
        remembered = Remembered._make(row)
        return remembered if remembered.expires_at > now else None

    def put(
        self, owner: str, key: str, body_digest: str, formula_id: str, duplicate: bool, now: float
    ) -> Remembered:
        remembered = Remembered(key, body_digest, formula_id, duplicate, now + self.ttl, owner)
        self.restore(remembered)
        return remembered

    def restore(self, remembered: Remembered) -> None:
        """Add a remembered answer (from ``put`` or from the journal, oldest first)."""
        row = cast(_Row, tuple(remembered))
        self._by_owner.setdefault(remembered.owner, {})[remembered.key] = row
        self._order.append(row)

    def discard(self, remembered: Remembered) -> None:
        """Undo the latest ``put`` (a submit that could not finish)."""
        if self._order and self._order[-1] == remembered:
            self._order.pop()
        self._by_owner.get(remembered.owner, {}).pop(remembered.key, None)

    def expire(self, now: float) -> int:
        dropped = 0
        while self._order:
            row = self._order[0]
            old = Remembered._make(row)
            if old.expires_at > now:
                break
            self._order.popleft()
            rows = self._by_owner[old.owner]
            # The key may have been recorded again since, under a newer row.
            if rows.get(old.key) is row:
                del rows[old.key]
            dropped += 1
        return dropped
