"""What the embedded engine keeps per formula, and per Idempotency-Key on top of it.

``python -m bench.memory N`` (run by ``bench/run`` in a child process, so
nothing else it made is counted) submits N new make-ups without a key, then
N with one, to an in-memory ``EmbeddedBroker``, and prints one JSON line with
the bytes each kept, measured by ``tracemalloc``: every Python allocation
still alive afterwards (store, dedupe index, queue, keys), none of the
answers, which are garbage by then. The same work on the same interpreter
gives the same figures, so a run or two is enough.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from decimal import Decimal

from bench.stack import ROOT
from broker.engines.embedded import EmbeddedBroker
from broker.formula import FormulaDraft, Material, fingerprint
from broker.interface import IdempotencyKey


@dataclass(frozen=True)
class MemoryFigures:
    count: int
    formula_bytes: float
    """Kept per formula submitted without an Idempotency-Key."""
    key_bytes: float
    """Kept per Idempotency-Key, over what its formula costs."""


def _draft(n: int) -> FormulaDraft:
    # Three materials, as the SPEC's example and the scale figures have.
    materials = tuple(
        Material(f"material {n} {i}", Decimal(c)) for i, c in enumerate(("15.5", "10", "5.2"))
    )
    return FormulaDraft(f"formula {n}", materials, fingerprint(materials))


def _kept(broker: EmbeddedBroker, first: int, count: int, keyed: bool) -> float:
    # Each request's objects are made inside the window, as unpickling makes
    # them in the broker; whatever the engine keeps of them is counted.
    before = tracemalloc.get_traced_memory()[0]
    for n in range(first, first + count):
        digest = hashlib.sha256(str(n).encode()).hexdigest()
        key = IdempotencyKey(f"client-key-{n:012d}", digest) if keyed else None
        broker.submit(_draft(n), key)
    return (tracemalloc.get_traced_memory()[0] - before) / count


def measure_here(count: int) -> MemoryFigures:
    broker = EmbeddedBroker(queue_capacity=3 * count)
    tracemalloc.start()
    _kept(broker, 0, 100, keyed=True)  # lazily made caches and structures, not per submit
    plain = _kept(broker, 1_000, count, keyed=False)
    keyed = _kept(broker, 1_000 + count, count, keyed=True)
    tracemalloc.stop()
    return MemoryFigures(count, plain, keyed - plain)


def measure(count: int = 20_000) -> MemoryFigures:
    """The figures from a child process of their own."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return MemoryFigures(**json.loads(done.stdout))


if __name__ == "__main__":
    figures = measure_here(int(sys.argv[1]))
    print(json.dumps(figures.__dict__))
