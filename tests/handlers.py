"""Handlers for tests that run real worker processes.

A gated handler writes ``<gate dir>/started-<formula id>`` and then waits
until ``<gate dir>/open`` exists, so a test can act (SIGKILL, SIGTERM) while a
message is certainly in hand, and decide when the handler finishes. The gate
directory comes from ``FORMULARY_TEST_GATE``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from broker.interface import FormulaView
from worker.handlers import summarise


def gated(formula: FormulaView) -> dict[str, Any]:
    gate = Path(os.environ["FORMULARY_TEST_GATE"])
    (gate / f"started-{formula.id}").touch()
    while not (gate / "open").exists():
        time.sleep(0.01)
    return summarise(formula)


def failing(formula: FormulaView) -> dict[str, Any]:
    raise RuntimeError(f"this handler always fails ({formula.id})")
