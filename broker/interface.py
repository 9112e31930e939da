"""What the API and the workers need from a broker: the narrow, typed surface.

Two ``Protocol`` classes, one per kind of client. ``broker.service.Broker`` (the
in-process object) and ``broker.client.BrokerClient`` (the same calls over a
``multiprocessing.managers`` connection) both satisfy them, and
``tests/test_broker_contract.py`` runs one suite against both. A later backend
(Redis Streams) implements the same two protocols.

Everything that crosses this boundary is a small frozen dataclass of
primitives (and ``Decimal``), so it pickles cheaply and cannot alias broker
state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.formula import FormulaDraft, Material
from broker.queue import Delivery, MessageInfo

__all__ = [
    "BrokerStats",
    "ConsumerBroker",
    "Delivery",
    "FormulaPage",
    "FormulaView",
    "IdempotencyKey",
    "MessageInfo",
    "Submission",
    "SubmissionBroker",
]

QUEUED = "queued"
PROCESSED = "processed"
FAILED = "failed"

# What complete_many says of each (receipt, summary) it was given.
COMPLETED = "completed"  # result recorded (or already there), message acked
ALREADY_ACKED = "already_acked"  # the message was acked before: nothing changed
STALE = "stale"  # the lease is no longer this receipt's: nothing changed
INVALID_SUMMARY = "invalid_summary"  # JSON cannot hold the summary: nothing changed


@dataclass(frozen=True, slots=True)
class FormulaView:
    """A stored formula as clients see it, with its processing state."""

    id: str
    name: str
    materials: tuple[Material, ...]
    fingerprint: str
    message_id: str
    created_at: str  # RFC 3339, UTC
    status: str  # QUEUED | PROCESSED | FAILED
    deliveries: int
    processed_at: str | None
    summary: Mapping[str, Any] | None

    def __reduce__(self) -> tuple[type[FormulaView], tuple[Any, ...]]:
        # Pickled on every read and submit: as a call, not slots state (faster).
        return (FormulaView, tuple([getattr(self, name) for name in self.__slots__]))

    def as_data(self) -> dict[str, Any]:
        """Plain data for a JSON document (concentrations and figures stay ``Decimal``)."""
        return {
            "id": self.id,
            "name": self.name,
            "materials": [
                {"name": m.name, "concentration": m.concentration} for m in self.materials
            ],
            "fingerprint": self.fingerprint,
            "status": self.status,
            "message_id": self.message_id,
            "created_at": self.created_at,
            "deliveries": self.deliveries,
            "processed_at": self.processed_at,
            "summary": None if self.summary is None else dict(self.summary),
        }


@dataclass(frozen=True, slots=True)
class Submission:
    """The answer to an accepted submit: the formula as stored then.

    ``replayed`` is true when an ``Idempotency-Key`` matched an earlier submit
    and this is that submit's answer again, not a new formula.
    """

    formula: FormulaView
    replayed: bool = False

    def __reduce__(self) -> tuple[type[Submission], tuple[FormulaView, bool]]:
        # The dataclass default pickles slots state through fields(): slower.
        return (Submission, (self.formula, self.replayed))


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's ``Idempotency-Key`` and a digest of the body it came with."""

    key: str
    body_digest: str


@dataclass(frozen=True, slots=True)
class FormulaPage:
    items: tuple[FormulaView, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """Gauges (now) and counters (totals since the broker started)."""

    formulas: int
    depth: int
    in_flight: int
    delayed: int
    dead: int
    submitted: int
    duplicates: int
    refused_capacity: int
    published: int
    delivered: int
    redelivered: int
    acked: int
    nacked: int
    dead_lettered: int
    redriven: int
    processed: int


class SubmissionBroker(Protocol):
    """What the HTTP API needs."""

    def ping(self) -> bool:
        """True when the broker answers."""

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        """Store a new make-up and publish its message, atomically.

        Raises ``DuplicateFormula`` (nothing stored or published), ``QueueFull``
        (likewise) or ``IdempotencyKeyReused``.
        """

    def get_formula(self, formula_id: str) -> FormulaView:
        """Raises ``FormulaNotFound``."""

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        """Newest first; raises ``InvalidCursor`` for a cursor it did not hand out."""

    def stats(self) -> BrokerStats: ...


class ConsumerBroker(Protocol):
    """What a worker needs."""

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        """Lease up to ``max_messages``; wait up to ``wait_seconds`` for the first."""

    def get_formula(self, formula_id: str) -> FormulaView: ...

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        """Several at once (one round trip for a batch); None for an unknown id."""

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        """Record the handler's result (first one wins) and ack, as one step.

        False if the message was already acked; ``StaleReceipt`` (nothing
        recorded) if the lease is no longer this receipt's; ``InvalidSummary``
        if JSON cannot hold the summary.
        """

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """``complete`` for a batch, in one step and one journal write.

        One outcome per item, in order: ``COMPLETED``, ``ALREADY_ACKED``,
        ``STALE`` or ``INVALID_SUMMARY`` (the last three change nothing).
        """

    def ack(self, receipt: str) -> bool: ...

    def nack(self, receipt: str, delay: float = 0.0) -> None: ...

    def extend(self, receipt: str, seconds: float) -> float: ...
