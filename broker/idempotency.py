"""Idempotency keys: the first answer to a key, kept for a while, and its stored form.

Every key lives for the same ``ttl``, so keys expire in the order they were
recorded: a deque in that order lets ``expire`` drop the old ones from the
front in O(expired), never scanning the live keys. ``get`` and ``put`` are O(1).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import simplejson

from broker.errors import DuplicateFormula
from broker.formula import Material
from broker.interface import FormulaView, Submission

Outcome = Submission | DuplicateFormula


@dataclass(frozen=True, slots=True)
class Remembered:
    key: str
    body_digest: str
    outcome: Outcome
    expires_at: float  # wall-clock seconds


class IdempotencyKeys:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_key: dict[str, Remembered] = {}
        self._order: deque[Remembered] = deque()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str, now: float) -> Remembered | None:
        """The live answer for ``key``; an expired one counts as none."""
        remembered = self._by_key.get(key)
        return remembered if remembered is not None and remembered.expires_at > now else None

    def put(self, key: str, body_digest: str, outcome: Outcome, now: float) -> Remembered:
        remembered = Remembered(key, body_digest, outcome, now + self.ttl)
        self.restore(remembered)
        return remembered

    def restore(self, remembered: Remembered) -> None:
        """Add a remembered answer (from ``put`` or from the journal, oldest first)."""
        self._by_key[remembered.key] = remembered
        self._order.append(remembered)

    def discard(self, remembered: Remembered) -> None:
        """Undo the latest ``put`` (a submit that could not finish)."""
        if self._order and self._order[-1] is remembered:
            self._order.pop()
        self._by_key.pop(remembered.key, None)

    def expire(self, now: float) -> int:
        dropped = 0
        while self._order and self._order[0].expires_at <= now:
            old = self._order.popleft()
            if self._by_key.get(old.key) is old:
                del self._by_key[old.key]
            dropped += 1
        return dropped


# -- the journal's form of an answer ------------------------------------------------

_ENCODER = simplejson.JSONEncoder(use_decimal=True, separators=(",", ":"))


def encode_outcome(outcome: Outcome) -> str:
    """An answer as JSON text, exact decimals included, for the journal."""
    document: dict[str, Any]
    if isinstance(outcome, DuplicateFormula):
        document = {
            "kind": "duplicate",
            "existing_id": outcome.existing_id,
            "fingerprint": outcome.fingerprint,
            "replayed": outcome.replayed,
        }
    else:
        view = outcome.formula
        document = {
            "kind": "submission",
            "replayed": outcome.replayed,
            "formula": {
                "id": view.id,
                "name": view.name,
                "materials": [[m.name, str(m.concentration)] for m in view.materials],
                "fingerprint": view.fingerprint,
                "message_id": view.message_id,
                "created_at": view.created_at,
                "status": view.status,
                "deliveries": view.deliveries,
                "processed_at": view.processed_at,
                "summary": view.summary,
            },
        }
    text: str = _ENCODER.encode(document)
    return text


def decode_outcome(text: str) -> Outcome:
    """The answer ``encode_outcome`` wrote, equal to the original field by field."""
    document = json.loads(text, parse_float=Decimal)
    if document["kind"] == "duplicate":
        return DuplicateFormula(
            document["existing_id"], document["fingerprint"], document["replayed"]
        )
    view = document["formula"]
    return Submission(
        FormulaView(
            id=view["id"],
            name=view["name"],
            materials=tuple(Material(name, Decimal(c)) for name, c in view["materials"]),
            fingerprint=view["fingerprint"],
            message_id=view["message_id"],
            created_at=view["created_at"],
            status=view["status"],
            deliveries=view["deliveries"],
            processed_at=view["processed_at"],
            summary=view["summary"],
        ),
        replayed=document["replayed"],
    )
