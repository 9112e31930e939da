"""Handlers: what a worker does with a formula. Pure and idempotent.

A handler takes a ``FormulaView`` and returns a summary mapping (plain data,
``Decimal`` for exact figures). The broker records the first summary for a
formula and ignores later ones, so running a handler twice is harmless.
Workers pick one by import path (``FORMULARY_HANDLER=module:function``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from broker.interface import FormulaView

Handler = Callable[[FormulaView], Mapping[str, Any]]

HUNDRED = Decimal(100)


def summarise(formula: FormulaView) -> dict[str, Any]:
    """The default: material count, total concentration, and what the carrier makes up."""
    total = sum((m.concentration for m in formula.materials), Decimal(0))
    return {
        "material_count": len(formula.materials),
        "total_concentration": total,
        "carrier_remainder": HUNDRED - total,
    }


def load_handler(path: str) -> Handler:
    """``"package.module:function"`` -> the function."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"handler {path!r} must look like module:function")
    module = importlib.import_module(module_name)
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ValueError(f"handler {path!r} is not a callable")
    return handler  # type: ignore[no-any-return]
