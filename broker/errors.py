"""The broker's domain errors: one tree, mapped to HTTP in ``api/problems.py``.

These cross the manager connection by pickling. Unpickling calls
``cls(*exc.args)``, so every class passes *all* of its constructor arguments,
in order, to ``Exception.__init__`` and reads them back through properties.
``tests/test_errors.py`` round-trips each one.
"""

from __future__ import annotations

from dataclasses import dataclass


class FormularyError(Exception):
    """Base of every error the broker raises on purpose."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation problem: where (``materials[1].concentration``) and what."""

    field: str
    message: str


class InvalidFormula(FormularyError):
    """The submitted body breaks one or more rules; every problem is listed."""

    def __init__(self, errors: tuple[FieldError, ...]) -> None:
        super().__init__(tuple(errors))

    @property
    def errors(self) -> tuple[FieldError, ...]:
        result: tuple[FieldError, ...] = self.args[0]
        return result


class DuplicateFormula(FormularyError):
    """A formula with the same make-up is already stored.

    ``replayed`` is true when this answer is an ``Idempotency-Key`` replay.
    """

    def __init__(self, existing_id: str, fingerprint: str, replayed: bool = False) -> None:
        super().__init__(existing_id, fingerprint, replayed)

    @property
    def existing_id(self) -> str:
        return str(self.args[0])

    @property
    def fingerprint(self) -> str:
        return str(self.args[1])

    @property
    def replayed(self) -> bool:
        return bool(self.args[2])


class IdempotencyKeyReused(FormularyError):
    """The key was first used with a different body."""

    def __init__(self, key: str) -> None:
        super().__init__(key)

    @property
    def key(self) -> str:
        return str(self.args[0])


class QueueFull(FormularyError):
    """The queue holds ``capacity`` messages; the submit is refused as a whole."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)

    @property
    def capacity(self) -> int:
        return int(self.args[0])


class FormulaNotFound(FormularyError):
    """No formula has this id."""

    def __init__(self, formula_id: str) -> None:
        super().__init__(formula_id)

    @property
    def formula_id(self) -> str:
        return str(self.args[0])


class InvalidCursor(FormularyError):
    """A list cursor that this broker did not hand out."""

    def __init__(self, cursor: str) -> None:
        super().__init__(cursor)

    @property
    def cursor(self) -> str:
        return str(self.args[0])


class InvalidSummary(FormularyError):
    """A handler's summary cannot be stored as JSON; nothing was recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self.args[0])


class StaleReceipt(FormularyError):
    """The receipt is no longer the message's current lease: nothing changed."""

    def __init__(self, receipt: str) -> None:
        super().__init__(receipt)

    @property
    def receipt(self) -> str:
        return str(self.args[0])


class MessageNotFound(FormularyError):
    """No message (live or dead) has this id."""

    def __init__(self, message_id: str) -> None:
        super().__init__(message_id)

    @property
    def message_id(self) -> str:
        return str(self.args[0])


class ApiKeyNotFound(FormularyError):
    """No API key has this id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id)

    @property
    def key_id(self) -> str:
        return str(self.args[0])


class StorageFailed(FormularyError):
    """The engine could not make a change durable; nothing that was asked happened."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self.args[0])


class BrokerUnavailable(FormularyError):
    """The broker could not be reached; the caller may retry later.

    Raised on the client side only, by ``broker.client``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self.args[0])
