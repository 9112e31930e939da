"""What the journal records and gives back: the broker's state changes, as data.

Each change is a small frozen dataclass naming one step of the broker's state
(a formula stored, a key remembered, a delivery counted, a result recorded,
a message acked, buried or redriven, keys forgotten, an API key made or
revoked). The broker hands a list
of them to ``Journal.write`` per atomic step; ``Journal.load`` gives the whole
state back as a :class:`Recovered`. Kept apart from ``journal`` so a reader
sees the vocabulary without the SQLite that stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from broker.engines.embedded.apikeys import ApiKeyRecord
from broker.engines.embedded.idempotency import Remembered
from broker.engines.embedded.store import FormulaRecord

__all__ = [
    "BuryMessage",
    "Change",
    "CountDelivery",
    "CreateApiKey",
    "DeleteMessage",
    "ForgetKeys",
    "RecordResult",
    "Recovered",
    "RecoveredMessage",
    "RedriveMessage",
    "RememberKey",
    "RevokeApiKey",
    "StoreFormula",
]


# -- changes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreFormula:
    """A new formula and its ``formula.created`` message (no deliveries, live)."""

    record: FormulaRecord


@dataclass(frozen=True, slots=True)
class RememberKey:
    """An ``Idempotency-Key`` and the first answer given for it."""

    remembered: Remembered


@dataclass(frozen=True, slots=True)
class CountDelivery:
    """A message was delivered: its own count (reset on redrive) and its formula's total."""

    message_id: str
    formula_id: str
    message_deliveries: int
    formula_deliveries: int


@dataclass(frozen=True, slots=True)
class RecordResult:
    """A handler's result and the ack of its message; the first result recorded wins."""

    formula_id: str
    message_id: str
    processed_at: float
    summary_json: str  # store.pack_summary


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    """A message was acked."""

    message_id: str


@dataclass(frozen=True, slots=True)
class BuryMessage:
    """A message went to the dead letters (it is loaded after the older ones)."""

    message_id: str


@dataclass(frozen=True, slots=True)
class RedriveMessage:
    """A dead letter is live again, delivery count 0, behind every fresh message."""

    message_id: str


@dataclass(frozen=True, slots=True)
class ForgetKeys:
    """Idempotency keys with ``expires_at <= before`` are gone."""

    before: float


@dataclass(frozen=True, slots=True)
class CreateApiKey:
    """A new API key (revoked already when a copy brings one in)."""

    record: ApiKeyRecord


@dataclass(frozen=True, slots=True)
class RevokeApiKey:
    """An API key was revoked; a key revoked before keeps its first time."""

    key_id: str
    revoked_at: float


Change = (
    StoreFormula
    | RememberKey
    | CountDelivery
    | RecordResult
    | DeleteMessage
    | BuryMessage
    | RedriveMessage
    | ForgetKeys
    | CreateApiKey
    | RevokeApiKey
)


# -- what load() returns ---------------------------------------------------------


class RecoveredMessage(NamedTuple):
    """One unacknowledged message, as ``MessageQueue.restore`` takes it."""

    message_id: str
    formula_id: str
    fingerprint: str
    deliveries: int
    dead: bool


@dataclass(frozen=True)
class Recovered:
    """Everything the journal holds.

    ``formulas`` in submit order; ``messages`` live ones in queue order (fresh
    in publish order, then redriven in redrive order) followed by dead letters
    oldest first; ``keys`` oldest first, expired or not (the broker expires
    them); ``api_keys`` in the order they were made, revoked ones included.
    """

    formulas: list[FormulaRecord]
    messages: list[RecoveredMessage]
    keys: list[Remembered]
    api_keys: list[ApiKeyRecord] = field(default_factory=list)
