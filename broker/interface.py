"""The broker as its clients see it: the typed surface, the values that cross it, its method list.

Every engine (``broker.engines``) implements :class:`Broker`; the API, the
workers and the admin socket each ask only for the part they use
(:class:`SubmissionBroker`, :class:`ConsumerBroker`, :class:`OperatorBroker`),
and ``broker.client.BrokerClient`` offers the same calls from another process.
None of them learns which engine answers.

One list of methods. The Protocols below are the only place a broker method
is declared; :data:`METHODS` is read from them, and from it come the methods
the manager exposes (``broker.transport``) and the client's call path
(``broker.client``). Adding a method means writing it here and in each
engine. :func:`read_only` marks the methods that change nothing, which the
client may send again after a lost connection.

Everything that crosses is a small frozen dataclass of primitives (and
``Decimal``), so it pickles cheaply and cannot alias an engine's state. Times
are wall-clock epoch seconds (``rfc3339`` writes them for people); receipts
and cursors are opaque strings that only the engine that made them reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

from broker.errors import FormularyError
from broker.formula import FormulaDraft, Material

__all__ = [
    "ALREADY_ACKED",
    "COMPLETED",
    "FAILED",
    "INVALID_SUMMARY",
    "METHODS",
    "PROCESSED",
    "QUEUED",
    "STALE",
    "ApiKey",
    "Broker",
    "BrokerStats",
    "ConsumerBroker",
    "Delivery",
    "FormulaPage",
    "FormulaView",
    "IdempotencyKey",
    "MessageInfo",
    "NewApiKey",
    "OperatorBroker",
    "Submission",
    "SubmissionBroker",
    "SubmitOutcome",
    "SubmitRequest",
    "read_only",
    "rfc3339",
    "unwrap",
]

# A formula's processing state.
QUEUED: Final = "queued"
PROCESSED: Final = "processed"
FAILED: Final = "failed"

# What complete_many says of each (receipt, summary) it was given.
COMPLETED: Final = "completed"  # result recorded (or already there), message acked
ALREADY_ACKED: Final = "already_acked"  # the message was acked before: nothing changed
STALE: Final = "stale"  # the lease is no longer this receipt's: nothing changed
INVALID_SUMMARY: Final = "invalid_summary"  # JSON cannot hold the summary: nothing changed

# A message's state, as MessageInfo.state reports it.
READY: Final = "ready"
IN_FLIGHT: Final = "in_flight"
DELAYED: Final = "delayed"
DEAD: Final = "dead"

MAX_PAGE: Final = 500
"""Most formulas one ``list_formulas`` page holds."""


# -- values --------------------------------------------------------------------------


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
        """The formula as plain data, for every document that shows one (HTTP, admin).

        Concentrations and summary figures stay ``Decimal``: the writer decides
        how to spell them exactly.
        """
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
    """A client's ``Idempotency-Key`` and a digest of the body it came with.

    ``owner`` is the id of the API key that sent it: the same string from two
    API keys is two independent keys. Empty with ``FORMULARY_AUTH=off``.
    """

    key: str
    body_digest: str
    owner: str = ""


SubmitRequest = tuple[FormulaDraft, IdempotencyKey | None]
"""One submit as ``submit_many`` takes it."""

SubmitOutcome = Submission | FormularyError
"""One submit's answer as a value: the ``Submission``, or the error ``submit`` raises."""


def unwrap(outcome: SubmitOutcome) -> Submission:
    """The one place a submit's outcome becomes a return value or a raised error."""
    if isinstance(outcome, FormularyError):
        raise outcome
    return outcome


@dataclass(frozen=True, slots=True)
class FormulaPage:
    items: tuple[FormulaView, ...]
    next_cursor: str | None  # opaque; None on the last page


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message leased to a consumer."""

    message_id: str
    formula_id: str
    fingerprint: str
    receipt: str
    """Opaque, new for each delivery; ack, nack, extend and complete take it."""
    delivery: int
    """1 for the first delivery, 2 for the second, ..."""
    lease_expires_at: float
    """Wall-clock epoch seconds after which the receipt is stale unless extended."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as operators see it."""

    message_id: str
    formula_id: str
    fingerprint: str
    state: str
    """``READY``, ``IN_FLIGHT``, ``DELAYED`` or ``DEAD``."""
    deliveries: int
    """Deliveries since it was published or last redriven."""
    consumer: str | None
    """Holder of the current lease, if in flight."""
    visible_at: float | None
    """Wall-clock epoch seconds: the lease's end (in flight) or the delay's (delayed)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as operators and the API see it: never its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    """Of ``broker.apikeys.SCOPES``."""
    created_at: str  # RFC 3339, UTC
    revoked_at: str | None

    def as_data(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key just made, with its secret: the only time the secret is shown."""

    key: ApiKey
    secret: str = field(repr=False)


def _gauge(metric: str, text: str) -> Any:
    return field(metadata={"kind": "gauge", "metric": metric, "help": text})


def _counter(metric: str, text: str) -> Any:
    return field(metadata={"kind": "counter", "metric": metric, "help": text})


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """Gauges (now) and counters (totals since the broker started).

    Each field's metadata names its Prometheus metric and help text, so that
    ``api.metrics`` exports every field by iterating them.
    """

    formulas: int = _gauge("broker_formulas", "Formulas stored.")
    depth: int = _gauge("broker_queue_depth", "Messages ready to be delivered.")
    in_flight: int = _gauge("broker_in_flight", "Messages leased to a consumer and not yet acked.")
    delayed: int = _gauge("broker_delayed", "Messages waiting out a nack delay.")
    dead: int = _gauge("broker_dead_letters", "Messages in the dead-letter queue.")
    submitted: int = _counter("broker_submitted", "Submits that stored a new formula.")
    duplicates: int = _counter("broker_duplicates", "Submits refused as a known make-up (409).")
    refused_capacity: int = _counter(
        "broker_refused_capacity", "Submits refused by a full queue (503)."
    )
    published: int = _counter("broker_published", "Messages published.")
    delivered: int = _counter("broker_delivered", "Deliveries to consumers, redeliveries included.")
    redelivered: int = _counter("broker_redelivered", "Deliveries of a message delivered before.")
    acked: int = _counter("broker_acked", "Messages acked.")
    nacked: int = _counter("broker_nacked", "Messages nacked.")
    dead_lettered: int = _counter(
        "broker_dead_lettered", "Messages moved to the dead-letter queue."
    )
    redriven: int = _counter("broker_redriven", "Dead letters redriven.")
    processed: int = _counter("broker_processed", "Formulas whose handler result was recorded.")


def rfc3339(epoch_seconds: float) -> str:
    """``2026-11-26T10:46:11.366Z``: how every time is written for people."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the surface ---------------------------------------------------------------------------

Method = TypeVar("Method", bound=Callable[..., Any])

_READ_ONLY: Final = "__formulary_read_only__"


def read_only(method: Method) -> Method:
    """Mark a broker method that changes nothing: a client may send it twice."""
    setattr(method, _READ_ONLY, True)
    return method


class BaseBroker(Protocol):
    """What every client of the broker uses."""

    @read_only
    def ping(self) -> bool:
        """True when the broker answers."""

    @read_only
    def get_formula(self, formula_id: str) -> FormulaView:
        """Raises ``FormulaNotFound``."""

    @read_only
    def stats(self) -> BrokerStats:
        """The whole system's figures."""


class SubmissionBroker(BaseBroker, Protocol):
    """What the HTTP API needs."""

    @read_only
    def authenticate(self, key_id: str, secret_digest: str) -> ApiKey | None:
        """The key ``key_id`` if ``secret_digest`` is its secret's (``broker.apikeys``) and
        it is not revoked; None otherwise. Compared in constant time."""

    def rate_limit(self, key_id: str) -> float:
        """Spend one of the key's requests under ``FORMULARY_RATE_LIMIT``: 0.0 if it may
        go ahead, else the seconds until it may (nothing spent). Always 0.0 without a
        limit."""

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        """Store a new make-up and publish its message, atomically.

        Raises ``DuplicateFormula`` (nothing stored or published), ``QueueFull``
        (likewise), ``IdempotencyKeyReused`` or ``StorageFailed``.
        """

    @read_only
    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        """Newest first, at most ``MAX_PAGE``; ``InvalidCursor`` for a cursor not handed out."""


class ConsumerBroker(BaseBroker, Protocol):
    """What a worker needs."""

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        """Lease up to ``max_messages``; wait up to ``wait_seconds`` for the first.

        Redeliveries come before fresh messages. ``visibility_timeout``
        defaults to the broker's setting.
        """

    @read_only
    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        """Several at once (one round trip for a batch); None for an unknown id."""

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        """Record the handler's result (first one wins) and ack, as one step.

        False if the message was already acked; ``StaleReceipt`` (nothing
        recorded) if the lease is no longer this receipt's; ``InvalidSummary``
        if JSON cannot hold the summary.
        """

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """``complete`` for a batch, in one step and one durable write.

        One outcome per item, in order: ``COMPLETED``, ``ALREADY_ACKED``,
        ``STALE`` or ``INVALID_SUMMARY`` (the last three change nothing).
        """

    def ack(self, receipt: str) -> bool:
        """Remove the message for good; False if it is gone already, ``StaleReceipt``
        if the lease is no longer this receipt's."""

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        """Give the message back, visible at once or after ``delay`` seconds (dead-lettered
        instead on its last allowed delivery); ``StaleReceipt`` as for ``ack``."""

    def extend(self, receipt: str, seconds: float) -> float:
        """Heartbeat: the lease now ends ``seconds`` from now; returns that time
        (wall-clock epoch seconds); ``StaleReceipt`` as for ``ack``."""


class OperatorBroker(BaseBroker, Protocol):
    """What the admin socket needs."""

    @read_only
    def message_info(self, message_id: str) -> MessageInfo:
        """Raises ``MessageNotFound`` (an acked message is gone for good)."""

    @read_only
    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        """Dead letters, oldest first."""

    def redrive(self, message_id: str) -> None:
        """A dead letter back to the queue with a fresh delivery count; ``MessageNotFound``."""

    def redrive_all(self) -> int:
        """Redrive every dead letter; returns how many."""

    def create_key(self, name: str, scopes: Sequence[str]) -> NewApiKey:
        """A new API key with ``scopes`` (of ``broker.apikeys.SCOPES``); ``ValueError`` for
        an empty or over-long name or an unknown scope. Only a digest of the secret is kept."""

    @read_only
    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""

    def revoke_key(self, key_id: str) -> None:
        """From now on the key authenticates nothing; ``ApiKeyNotFound``. Revoking a
        revoked key changes nothing."""


class Broker(SubmissionBroker, ConsumerBroker, OperatorBroker, Protocol):
    """Everything a broker answers: what each engine implements and the client offers."""

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        """``submit`` for several clients' submits at once: one outcome per request, in order.

        Each is its own atomic submit, answered exactly as if it had come
        alone and after every request before it in the list. The client sends
        the submits a process's threads have ready together.
        """


def _methods(protocol: type) -> dict[str, bool]:
    found: dict[str, bool] = {}
    for cls in reversed(protocol.__mro__):
        if cls.__module__ == __name__:
            for name, member in vars(cls).items():
                if callable(member) and not name.startswith("_"):
                    found[name] = bool(getattr(member, _READ_ONLY, False))
    return found


METHODS: Final[Mapping[str, bool]] = _methods(Broker)
"""Every broker method, by name: True for the ones that change nothing."""
