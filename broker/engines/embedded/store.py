"""The formula store and its dedupe index.

Plain dictionaries, no locking: the engine's facade (``service``) holds its
lock around every call. Costs: ``add``/``discard_last``/``get``/
``by_fingerprint``/``count_delivery``/``record_result`` are O(1); ``page`` is
O(limit); ``restore`` is O(records).

Each formula is kept as a plain tuple of strings, bytes and numbers, never as
an object of a class: CPython's collector stops tracking such a tuple the
first time it sees one, so the stored formulas cost a collection nothing.
Class instances stay tracked: every full collection would walk every formula
stored since the broker started (33 ms at 100,000, with every submit in
flight waiting; a broker that runs for a month stores millions). A record is
read as a :class:`FormulaRecord` and changed by replacing its tuple.
Recovered records are the exception: ``restore`` keeps the journal's
``FormulaRecord`` objects as they are, since copying a million of them adds
about a tenth to the restart, and the broker process freezes everything it
recovered out of the collector at start (``broker/__main__.py``).

Ids are kept in insertion order in a list so that the newest-first listing
is a reverse slice and a cursor is just a position. Only the most recent
formula can be discarded, which is all an atomic submit's rollback needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple, cast

from broker.engines.shared import decode_cursor, encode_cursor, unpack_summary
from broker.errors import InvalidCursor
from broker.formula import Material
from broker.interface import FormulaView, rfc3339


class FormulaRecord(NamedTuple):
    """One stored formula and its processing state, as a value.

    The materials and the summary are kept as one string each (see
    ``pack_materials`` and ``pack_summary``) and unpacked when a view is made:
    a million stored formulas then cost two million strings rather than
    several million dicts, ``Material`` and ``Decimal`` objects, which was
    most of the broker's memory and recovery time. Make one with
    :meth:`new`, which takes the fingerprint as the hex text it is everywhere
    else.
    """

    formula_id: str
    name: str
    packed_materials: str
    digest: bytes
    """The fingerprint's SHA-256 as its 32 bytes: half the size of the hex
    text, and the dedupe index's key."""
    message_id: str
    created_at: float
    deliveries: int = 0
    processed_at: float | None = None
    summary_json: str | None = None

    @classmethod
    def new(
        cls,
        formula_id: str,
        name: str,
        packed_materials: str,
        fingerprint: str,
        message_id: str,
        created_at: float,
        deliveries: int = 0,
        processed_at: float | None = None,
        summary_json: str | None = None,
    ) -> FormulaRecord:
        return cls(
            formula_id,
            name,
            packed_materials,
            bytes.fromhex(fingerprint),
            message_id,
            created_at,
            deliveries,
            processed_at,
            summary_json,
        )

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


_Row = tuple[str, str, str, bytes, str, float, int, float | None, str | None]
"""A ``FormulaRecord``'s fields as the plain tuple the store keeps (see the module)."""


def _row(record: FormulaRecord) -> _Row:
    # A copy as a plain tuple: the collector untracks only those, never an
    # instance of a tuple's subclass such as a NamedTuple.
    return cast(_Row, tuple(record))


class FormulaStore:
    def __init__(self) -> None:
        self._rows: dict[str, _Row | FormulaRecord] = {}  # formula id ->
        self._by_digest: dict[bytes, str] = {}  # -> formula id
        self._order: list[str] = []  # formula ids

    def __len__(self) -> int:
        return len(self._order)

    def get(self, formula_id: str) -> FormulaRecord | None:
        row = self._rows.get(formula_id)
        return None if row is None else FormulaRecord._make(row)

    def by_fingerprint(self, fingerprint: str) -> FormulaRecord | None:
        formula_id = self._by_digest.get(bytes.fromhex(fingerprint))
        return None if formula_id is None else FormulaRecord._make(self._rows[formula_id])

    def add(self, record: FormulaRecord) -> None:
        """Store a new record; its id and fingerprint must both be new."""
        if record.formula_id in self._rows or record.digest in self._by_digest:
            raise ValueError(f"formula {record.formula_id} is already stored")
        self._order.append(record.formula_id)
        self._rows[record.formula_id] = _row(record)
        self._by_digest[record.digest] = record.formula_id

    def restore(self, records: Iterable[FormulaRecord]) -> None:
        """``add`` for the records recovered from the journal, kept as they are (see the module)."""
        rows, by_digest, order = self._rows, self._by_digest, self._order
        for record in records:
            formula_id, digest = record.formula_id, record.digest
            if formula_id in rows or digest in by_digest:
                raise ValueError(f"formula {formula_id} is already stored")
            order.append(formula_id)
            rows[formula_id] = record
            by_digest[digest] = formula_id

    def discard_last(self, record: FormulaRecord) -> None:
        """Undo the latest ``add`` (a submit that could not finish)."""
        if not self._order or self._order[-1] != record.formula_id:
            raise ValueError("only the latest record can be discarded")
        self._order.pop()
        del self._rows[record.formula_id]
        del self._by_digest[record.digest]

    def count_delivery(self, formula_id: str) -> FormulaRecord | None:
        """One more delivery of the formula's message; the record as it now is."""
        row = self._rows.get(formula_id)
        if row is None:
            return None
        record = FormulaRecord._make(row)
        record = record._replace(deliveries=record.deliveries + 1)
        self._rows[formula_id] = _row(record)
        return record

    def record_result(self, formula_id: str, processed_at: float, summary_json: str) -> None:
        """The formula was processed, with this summary; it must be stored."""
        record = FormulaRecord._make(self._rows[formula_id])
        self._rows[formula_id] = _row(
            record._replace(processed_at=processed_at, summary_json=summary_json)
        )

    def page(self, limit: int, cursor: str | None) -> Page:
        """Up to ``limit`` records, newest first, after ``cursor``."""
        end = len(self._order) if cursor is None else self._decode(cursor) - 1
        start = max(0, end - limit)
        rows = self._rows
        records = tuple(FormulaRecord._make(rows[i]) for i in reversed(self._order[start:end]))
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
