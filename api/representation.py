"""Domain objects to JSON documents, with exact decimals.

Concentrations and summary figures are ``Decimal``. They are written as JSON
numbers with their exact digits (``15.5``, never ``15.4999999``) by handing
simplejson the digits as raw JSON text; nothing passes through ``float``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import simplejson

from broker.formula import decimal_text
from broker.interface import FormulaView


def dumps(document: Any) -> bytes:
    """Compact JSON, UTF-8, exact decimals."""
    text: str = simplejson.dumps(
        _exact(document), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return text.encode("utf-8")


def formula_document(formula: FormulaView) -> dict[str, Any]:
    return formula.as_data()


def formula_location(formula_id: str) -> str:
    return f"/formulas/{formula_id}"


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):
        return simplejson.RawJSON(decimal_text(value))
    if isinstance(value, Mapping):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_exact(v) for v in value]
    return value
