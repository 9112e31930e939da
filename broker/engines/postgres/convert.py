"""Between the database's rows and the broker's values: formulas, deliveries, keys, receipts.

The rows are what the statements of ``sql/queries.sql`` return, in their
column order; the values are ``broker.interface``'s. Pure functions: no
connection, no state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import simplejson

from broker.errors import DuplicateFormula, IdempotencyKeyReused, QueueFull
from broker.formula import Material
from broker.interface import (
    ALREADY_ACKED,
    COMPLETED,
    QUEUED,
    STALE,
    ApiKey,
    Delivery,
    FormulaView,
    Submission,
    SubmitOutcome,
    SubmitRequest,
    rfc3339,
)

__all__ = [
    "COMPLETE_OUTCOMES",
    "api_key",
    "delivery",
    "formula_view",
    "is_text",
    "pack_materials",
    "parse_receipt",
    "submit_group",
    "submit_outcome",
    "unpack_materials",
]

_RECEIPT_SEPARATOR: Final = "."

COMPLETE_OUTCOMES: Final = {
    "recorded": COMPLETED,
    "acked": COMPLETED,
    "gone": ALREADY_ACKED,
    "stale": STALE,
}
"""``formulary.complete``'s outcome as ``complete_many`` reports it."""


def pack_materials(materials: Sequence[Material]) -> str:
    """Materials as JSON text for the jsonb column, numbers with their exact digits."""
    text: str = _ENCODER.encode(_materials(materials))
    return text


def submit_group(requests: Sequence[SubmitRequest], new_id: Callable[[], str]) -> str:
    """``formulary.submit_many``'s group: a JSON array, one object per submit, in order.

    Each formula, and its message, gets a new id here; the database keeps them
    only if the submit stores the formula.
    """
    text: str = _ENCODER.encode(
        [
            {
                "owner": "" if key is None else key.owner,
                "key": None if key is None else key.key,
                "body_digest": None if key is None else key.body_digest,
                "formula_id": new_id(),
                "name": draft.name,
                "materials": _materials(draft.materials),
                "fingerprint": draft.fingerprint,
                "message_id": new_id(),
            }
            for draft, key in requests
        ]
    )
    return text


def _materials(materials: Sequence[Material]) -> list[dict[str, object]]:
    return [{"name": m.name, "concentration": m.concentration} for m in materials]


_ENCODER: Final = simplejson.JSONEncoder(use_decimal=True, separators=(",", ":"))


def unpack_materials(data: Sequence[Mapping[str, Any]]) -> tuple[Material, ...]:
    # Whole numbers come back as int, the rest as Decimal (the loader's parse_float).
    return tuple(Material(m["name"], Decimal(m["concentration"])) for m in data)


def submit_outcome(row: Sequence[Any], request: SubmitRequest, capacity: int) -> SubmitOutcome:
    """One answer of ``submit_many`` (its columns after ``ord``) as the submit's outcome."""
    outcome, formula_id, name, materials, fingerprint, message_id, created_at = row
    draft, idempotency = request
    if outcome == "key_reused":
        assert idempotency is not None
        return IdempotencyKeyReused(idempotency.key)
    if outcome == "full":
        return QueueFull(capacity)
    if outcome in ("duplicate", "duplicate_replayed"):
        return DuplicateFormula(formula_id, fingerprint, outcome == "duplicate_replayed")
    # The answer as given when the formula was stored: queued, undelivered.
    return Submission(
        FormulaView(
            id=formula_id,
            name=name,
            materials=draft.materials if outcome == "accepted" else unpack_materials(materials),
            fingerprint=fingerprint,
            message_id=message_id,
            created_at=rfc3339(created_at),
            status=QUEUED,
            deliveries=0,
            processed_at=None,
            summary=None,
        ),
        replayed=outcome == "replayed",
    )


def formula_view(row: Sequence[Any]) -> FormulaView:
    """A row of ``formulas_by_id`` (or ``formula_page``, whose last column it leaves)."""
    formula_id, name, materials, fingerprint, message_id, created_at, status = row[:7]
    deliveries, processed_at, summary = row[7:10]
    return FormulaView(
        id=formula_id,
        name=name,
        materials=unpack_materials(materials),
        fingerprint=fingerprint,
        message_id=message_id,
        created_at=rfc3339(created_at),
        status=status,
        deliveries=deliveries,
        processed_at=None if processed_at is None else rfc3339(processed_at),
        summary=summary,
    )


def delivery(row: Sequence[Any]) -> Delivery:
    """A row of ``lease``; its receipt names the message and the lease's token."""
    message_id, formula_id, fingerprint, token, count, expires_at = row[:6]
    return Delivery(
        message_id=message_id,
        formula_id=formula_id,
        fingerprint=fingerprint,
        receipt=f"{message_id}{_RECEIPT_SEPARATOR}{token}",
        delivery=count,
        lease_expires_at=expires_at,
    )


def parse_receipt(receipt: object) -> tuple[str, str] | None:
    """(message id, lease token) of a receipt ``delivery`` made; None for anything else."""
    # A receipt crosses the manager from a client: it may be anything.
    if not isinstance(receipt, str):
        return None
    message_id, separator, token = receipt.rpartition(_RECEIPT_SEPARATOR)
    if not separator or not message_id or not token:
        return None
    return message_id, token


def api_key(row: Sequence[Any]) -> ApiKey:
    """A row of ``api_key`` or ``api_keys``."""
    key_id, name, scopes, _, created_at, revoked_at = row
    return ApiKey(
        id=key_id,
        name=name,
        scopes=tuple(scopes),
        created_at=rfc3339(created_at),
        revoked_at=None if revoked_at is None else rfc3339(revoked_at),
    )


def is_text(value: object) -> bool:
    """Whether PostgreSQL text can hold ``value``: a str with no NUL."""
    # Ids and digests cross the manager from a client.
    return isinstance(value, str) and "\0" not in value
