"""Domain objects to JSON documents, with exact decimals.

Concentrations and summary figures are ``Decimal``. simplejson's
``use_decimal`` writes each as a JSON number with its exact digits (``15.5``,
never ``15.4999999``); nothing passes through ``float``. Stored concentrations
are canonical (``broker.formula.canonical_decimal``), so they print plainly:
``10``, not ``1E+1``.
"""

from __future__ import annotations

from typing import Any

import simplejson

_ENCODER = simplejson.JSONEncoder(
    use_decimal=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
)


def dumps(document: Any) -> bytes:
    """Compact JSON, UTF-8, exact decimals."""
    text: str = _ENCODER.encode(document)
    return text.encode("utf-8")


def formula_location(formula_id: str) -> str:
    return f"/formulas/{formula_id}"
