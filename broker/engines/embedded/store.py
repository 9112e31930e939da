"""The formula store and its dedupe index.

Plain dictionaries, no locking: the engine's facade (``service``) holds its
lock around every call. Costs: ``add``/``discard_last``/``get``/
``by_fingerprint`` are O(1); ``page`` is O(limit).

Records are kept in insertion order in a list so that the newest-first listing
is a reverse slice and a cursor is just a position. Only the most recent record
can be discarded, which is all an atomic submit's rollback needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from broker.engines.shared import decode_cursor, encode_cursor, unpack_summary
from broker.errors import InvalidCursor
from broker.formula import Material
from broker.interface import FormulaView, rfc3339


class FormulaRecord:
    """One stored formula and its processing state (mutable, broker-private).

    The materials and the summary are kept as one string each (see
    ``pack_materials`` and ``pack_summary``) and unpacked when a view is made:
    a million stored formulas then cost two million strings rather than
    several million dicts, ``Material`` and ``Decimal`` objects, which was
    most of the broker's memory and recovery time.
    """

    __slots__ = (
        "created_at",
        "deliveries",
        "digest",
        "formula_id",
        "message_id",
        "name",
        "packed_materials",
        "processed_at",
        "summary_json",
    )

    def __init__(
        self,
        formula_id: str,
        name: str,
        packed_materials: str,
        fingerprint: str,
        message_id: str,
        created_at: float,
        deliveries: int = 0,
        processed_at: float | None = None,
        summary_json: str | None = None,
    ) -> None:
        self.formula_id = formula_id
        self.name = name
        self.packed_materials = packed_materials
        # The SHA-256 as its 32 bytes: half the size of the hex text, and the
        # dedupe index's key.
        self.digest = bytes.fromhex(fingerprint)
        self.message_id = message_id
        self.created_at = created_at
        self.deliveries = deliveries
        self.processed_at = processed_at
        self.summary_json = summary_json

    @property
    def fingerprint(self) -> str:
        return self.digest.hex()

    @property
    def materials(self) -> tuple[Material, ...]:
        return unpack_materials(self.packed_materials)

    @property
    def summary(self) -> dict[str, Any] | None:
        return None if self.summary_json is None else unpack_summary(self.summary_json)


def view(
    record: FormulaRecord,
    status: str,
    materials: tuple[Material, ...] | None = None,
    *,
    as_submitted: bool = False,
) -> FormulaView:
    """The client's view of ``record`` in ``status``.

    ``as_submitted`` shows it as its 202 did (undelivered, unprocessed):
    everything in that answer is fixed when the formula is stored, so an
    Idempotency-Key replays it byte for byte from the record alone.
    ``materials`` saves unpacking what the caller has at hand.
    """
    processed_at = None if as_submitted else record.processed_at
    return FormulaView(
        id=record.formula_id,
        name=record.name,
        materials=record.materials if materials is None else materials,
        fingerprint=record.fingerprint,
        message_id=record.message_id,
        created_at=rfc3339(record.created_at),
        status=status,
        deliveries=0 if as_submitted else record.deliveries,
        processed_at=None if processed_at is None else rfc3339(processed_at),
        summary=None if as_submitted else record.summary,
    )


def pack_materials(materials: Iterable[Material]) -> str:
    """``name<TAB>decimal<TAB>name<TAB>decimal...``.

    Valid names never hold a tab (a control character), and ``str()`` of a
    canonical Decimal reads back as exactly that Decimal.
    """
    return "\t".join([part for m in materials for part in (m.name, str(m.concentration))])


def unpack_materials(packed: str) -> tuple[Material, ...]:
    parts = packed.split("\t")
    return tuple(Material(parts[i], Decimal(parts[i + 1])) for i in range(0, len(parts), 2))


@dataclass(frozen=True, slots=True)
class Page:
    records: tuple[FormulaRecord, ...]
    next_cursor: str | None


class FormulaStore:
    def __init__(self) -> None:
        self._by_id: dict[str, FormulaRecord] = {}
        self._by_digest: dict[bytes, FormulaRecord] = {}
        self._order: list[FormulaRecord] = []

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[FormulaRecord]:
        return iter(self._order)

    def get(self, formula_id: str) -> FormulaRecord | None:
        return self._by_id.get(formula_id)

    def by_fingerprint(self, fingerprint: str) -> FormulaRecord | None:
        return self._by_digest.get(bytes.fromhex(fingerprint))

    def add(self, record: FormulaRecord) -> None:
        """Store a new record; its id and fingerprint must both be new."""
        if record.formula_id in self._by_id or record.digest in self._by_digest:
            raise ValueError(f"formula {record.formula_id} is already stored")
        self._order.append(record)
        self._by_id[record.formula_id] = record
        self._by_digest[record.digest] = record

    def discard_last(self, record: FormulaRecord) -> None:
        """Undo the latest ``add`` (a submit that could not finish)."""
        if not self._order or self._order[-1] is not record:
            raise ValueError("only the latest record can be discarded")
        self._order.pop()
        del self._by_id[record.formula_id]
        del self._by_digest[record.digest]

    def page(self, limit: int, cursor: str | None) -> Page:
        """Up to ``limit`` records, newest first, after ``cursor``."""
        end = len(self._order) if cursor is None else self._decode(cursor) - 1
        start = max(0, end - limit)
        records = tuple(reversed(self._order[start:end]))
        # A cursor is the 1-based position of the last record returned: the
        # list's order is the store's order, so no record has to carry it.
        next_cursor = encode_cursor(start + 1) if start > 0 and records else None
        return Page(records, next_cursor)

    def _decode(self, cursor: str) -> int:
        """The position a cursor points at; positions only grow, so old cursors stay valid."""
        seq = decode_cursor(cursor)
        if seq > len(self._order):
            raise InvalidCursor(cursor)
        return seq
