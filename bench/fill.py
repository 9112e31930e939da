"""Fill a journal with N stored formulas, through the broker object, not over HTTP.

``python -m bench.fill PATH N [--state processed|queued]``

Builds the embedded engine (``EmbeddedBroker`` on ``SqliteJournal(PATH)``) in
this process and submits N three-material drafts (made directly, without
parsing JSON). With ``--state processed`` (the default: the steady state of a
system whose workers keep up) each is also received and completed with the
default handler's summary, so the broker started on the file afterwards holds
N processed formulas and an empty queue.

Only the fill groups many broker steps into one SQLite transaction (through
:class:`GroupedJournal`): what ends up in the file is exactly what the broker
journals, a million single-row commits would just take far longer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from broker.engines.embedded import EmbeddedBroker
from broker.engines.embedded.changes import Change, Recovered
from broker.engines.embedded.journal import SqliteJournal
from broker.formula import FormulaDraft, Material, fingerprint
from worker.handlers import summarise

log = logging.getLogger(__name__)

CHUNK = 10_000
_CONCENTRATIONS = (Decimal("15.5"), Decimal("10"), Decimal("5.2"))


class GroupedJournal:
    """A journal that writes the changes of many broker steps in one transaction."""

    def __init__(self, inner: SqliteJournal, group: int = 50_000) -> None:
        self._inner = inner
        self._group = group
        self._pending: list[Change] = []

    def load(self) -> Recovered:
        return self._inner.load()

    def write(self, changes: Sequence[Change]) -> None:
        self._pending.extend(changes)
        if len(self._pending) >= self._group:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._inner.write(self._pending)
            self._pending = []

    def close(self) -> None:
        self.flush()
        self._inner.close()


def draft(i: int) -> FormulaDraft:
    """Formula ``i``: three materials whose names make its make-up unique."""
    materials = (
        Material(f"Bergamot Oil {i:07d}", _CONCENTRATIONS[0]),
        Material(f"Lavender Absolute {i:07d}", _CONCENTRATIONS[1]),
        Material(f"Sandalwood {i:07d}", _CONCENTRATIONS[2]),
    )
    return FormulaDraft(f"Formula {i:07d}", materials, fingerprint(materials))


def _process_all(broker: EmbeddedBroker) -> int:
    done = 0
    while deliveries := broker.receive("bench-fill", 100):
        for delivery in deliveries:
            view = broker.get_formula(delivery.formula_id)
            broker.complete(delivery.receipt, summarise(view))
            done += 1
    return done


def fill(path: Path, count: int, *, processed: bool = True) -> float:
    """Store ``count`` formulas in the journal at ``path``; the seconds it took."""
    started = time.monotonic()
    journal = GroupedJournal(SqliteJournal(path))
    broker = EmbeddedBroker(queue_capacity=max(count, 1) + CHUNK, journal=journal)
    try:
        for start in range(0, count, CHUNK):
            for i in range(start, min(count, start + CHUNK)):
                broker.submit(draft(i))
            if processed:
                _process_all(broker)
            if (start + CHUNK) % 100_000 == 0:
                log.info("filled %d of %d", start + CHUNK, count)
    finally:
        broker.close()
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fill", description=__doc__)
    parser.add_argument("path", type=Path, help="journal file (created if missing)")
    parser.add_argument("count", type=int, help="formulas to store")
    parser.add_argument("--state", choices=("processed", "queued"), default="processed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    seconds = fill(args.path, args.count, processed=args.state == "processed")
    log.info("stored %d formulas (%s) in %s in %.1fs", args.count, args.state, args.path, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
