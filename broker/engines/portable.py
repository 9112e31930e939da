"""What crosses from one engine to another when ``broker.migrate`` copies a deployment.

The records are small frozen dataclasses of primitives, the same in every
engine: a formula with its processing state, an idempotency key's first
answer, an unacknowledged message, an API key. Ids cross unchanged, so the
clients' ids and ``Location`` paths keep working on the target, and API keys
cross with their secrets' digests, so every client's secret keeps working.

Each engine offers a :class:`Source` (what it holds, counted and iterated in
batches) and a :class:`Target` (what it holds, and one all-or-nothing import
of :class:`Records`).
Neither is part of ``broker.interface``: a copy runs with the brokers
stopped, straight on the engine's files or database, never through the
manager. Engines are imported only when one is opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Final, Protocol

from broker.engines import POSTGRESQL_SCHEMES

__all__ = [
    "MEMORY",
    "ApiKeyState",
    "FormulaState",
    "Holdings",
    "KeyState",
    "MessageState",
    "Records",
    "Refused",
    "Source",
    "Target",
    "TargetNotEmpty",
    "open_source",
    "open_target",
]

MEMORY: Final = ":memory:"


# -- the records -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormulaState:
    """A stored formula and its processing state. Times are wall-clock epoch seconds."""

    formula_id: str
    name: str
    materials: tuple[tuple[str, str], ...]
    """(name, concentration) pairs as submitted (trimmed), each concentration as the
    exact decimal text the engine keeps (``15.5``): never through a float, and no
    ``Decimal`` made for a million formulas that only pass through."""
    fingerprint: str
    message_id: str
    created_at: float
    deliveries: int
    """Every delivery of the formula's message, over its whole life."""
    processed_at: float | None
    summary_json: str | None
    """The handler's summary as the engine keeps it: JSON, numbers with exact digits."""


@dataclass(frozen=True, slots=True)
class KeyState:
    """An ``Idempotency-Key`` still alive: the formula its first answer named."""

    key: str
    body_digest: str
    formula_id: str
    duplicate: bool
    """The first answer was a 409 naming ``formula_id``, not its 202."""
    expires_at: float
    owner: str = ""
    """The id of the API key that sent it; ``""`` for none (``FORMULARY_AUTH=off``)."""


@dataclass(frozen=True, slots=True)
class MessageState:
    """An unacknowledged message: ready to deliver again (a lease or a delay is
    over, as after a broker restart), or a dead letter."""

    message_id: str
    formula_id: str
    fingerprint: str
    deliveries: int
    """Deliveries since it was published or last redriven."""
    dead: bool


@dataclass(frozen=True, slots=True)
class ApiKeyState:
    """An API key, revoked or not: its secret's digest, never the secret."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    secret_digest: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Holdings:
    """What an engine holds, counted."""

    formulas: int = 0
    keys: int = 0
    """Idempotency keys still alive (the ones a copy takes)."""
    expired_keys: int = 0
    messages: int = 0
    """Unacknowledged messages, dead letters included."""
    dead: int = 0
    api_keys: int = 0
    """API keys, revoked ones included."""

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def require_empty(self, where: str) -> None:
        """``TargetNotEmpty`` unless ``where`` (a target) holds nothing: a copy never mixes two
        deployments."""
        if not self.empty:
            raise TargetNotEmpty(where, self)

    def __str__(self) -> str:
        messages = _count(self.messages, "message")
        if self.dead:
            messages += f" ({_count(self.dead, 'dead letter')})"
        parts = [
            _count(self.formulas, "formula"),
            _count(self.keys, "idempotency key"),
            _count(self.expired_keys, "expired idempotency key"),
            messages,
            _count(self.api_keys, "API key"),
        ]
        return ", ".join(part for part in parts if part) or "nothing"


@dataclass(frozen=True, slots=True)
class Records:
    """A whole deployment as a copy carries it: every kind of record, in batches.

    Each is consumed once, as the target writes it; see ``Source`` for the order.
    """

    formulas: Iterable[Sequence[FormulaState]]
    keys: Iterable[Sequence[KeyState]]
    messages: Iterable[Sequence[MessageState]]
    api_keys: Iterable[Sequence[ApiKeyState]]


def _count(number: int, noun: str) -> str:
    if not number:
        return ""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


# -- what engines offer ----------------------------------------------------------------


class Source(Protocol):
    """An engine's state, read as records (the whole copy sees one consistent state)."""

    where: str
    """The source for people: a path, or ``user@host:port/dbname`` (never a password)."""

    def holdings(self) -> Holdings:
        """What it holds."""

    def formulas(self, batch: int) -> Iterator[Sequence[FormulaState]]:
        """Every formula, oldest first (the listing's order reversed), ``batch`` at a time."""

    def keys(self, batch: int) -> Iterator[Sequence[KeyState]]:
        """Every idempotency key that has not expired."""

    def messages(self, batch: int) -> Iterator[Sequence[MessageState]]:
        """Live messages in the order they would be delivered, then dead letters, oldest first."""

    def api_keys(self, batch: int) -> Iterator[Sequence[ApiKeyState]]:
        """Every API key, revoked ones included, oldest first."""

    def close(self) -> None: ...


class Target(Protocol):
    """An engine's state, filled from records in one transaction."""

    where: str

    def holdings(self) -> Holdings:
        """What it holds; a copy goes only into an engine that holds nothing."""

    def import_all(self, records: Records) -> None:
        """Store every record, all in one transaction, or none of them and raise.

        The batches are consumed as they are written, in whatever order the
        engine needs (so a caller that counts them sees the engine's
        progress); an exception raised while producing one rolls the whole
        import back and propagates. ``TargetNotEmpty`` if the engine holds
        anything (checked inside the transaction); ``EngineError`` if the
        records cannot be stored.
        """

    def close(self) -> None: ...


class Refused(Exception):
    """A copy this tool will not make; the message says why. Nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class TargetNotEmpty(Refused):
    """The target holds state already: a copy never mixes two deployments."""

    def __init__(self, where: str, holdings: Holdings) -> None:
        Exception.__init__(self, where, holdings)

    @property
    def where(self) -> str:
        return str(self.args[0])

    @property
    def holdings(self) -> Holdings:
        found: Holdings = self.args[1]
        return found

    def __str__(self) -> str:
        return f"the target {self.where} is not empty: it holds {self.holdings}"


# -- opening -----------------------------------------------------------------------


def open_source(data: str) -> Source:
    """The engine ``data`` names (a ``FORMULARY_DATA`` value), to copy from.

    ``Refused`` for ``:memory:``; ``EngineError`` if it cannot be read.
    """
    if data == MEMORY:
        raise Refused(f"the source cannot be {MEMORY}: it keeps nothing to copy")
    if data.startswith(POSTGRESQL_SCHEMES):
        from broker.engines.postgres import portable as postgres

        return postgres.open_source(data)
    from broker.engines.embedded import portable as embedded

    return embedded.open_source(data)


def open_target(data: str) -> Target:
    """The engine ``data`` names, to copy into (created, and its schema migrated, if new).

    ``Refused`` for ``:memory:``; ``EngineError`` if it cannot be used.
    """
    if data == MEMORY:
        raise Refused(f"the target cannot be {MEMORY}: nothing copied there would be kept")
    if data.startswith(POSTGRESQL_SCHEMES):
        from broker.engines.postgres import portable as postgres

        return postgres.open_target(data)
    from broker.engines.embedded import portable as embedded

    return embedded.open_target(data)
