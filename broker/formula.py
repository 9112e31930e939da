"""The formula model: its rules, a material's identity, and its canonical form.

A body goes through two steps. :func:`broker.strict_json.parse_json` turns
bytes into plain JSON values (every number an exact :class:`~decimal.Decimal`)
or refuses them as a whole; :func:`validate_formula` checks every rule of SPEC
"Data" on the result, collects every problem, and builds a
:class:`FormulaDraft` whose :attr:`~FormulaDraft.fingerprint` is the formula's
identity. :func:`parse_formula` does both. :func:`canonical_json` writes a
parsed document as one text per value; it lives here because its numbers are
written by :func:`canonical_decimal`.

Cost: validation is linear in the size of the document: the key-set, name and
number checks touch each value once. A 64 KiB body validates in a few
milliseconds.

Field paths in errors are ``body`` for the document itself, ``name``,
``materials``, ``materials[0]`` (indexes count from 0), ``materials[0].name``
and ``materials[0].concentration``. Problems with an object's key set (unknown
or repeated keys) are reported at the object's path; a missing key at the path
it should have had.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal

from broker.errors import FieldError, InvalidFormula
from broker.strict_json import parse_json, repeated_keys

MAX_NAME_LENGTH = 200
MAX_MATERIALS = 500
MAX_DECIMAL_PLACES = 6

_MAX_CONCENTRATION = Decimal(100)
_ZERO = Decimal(0)
_FORMULA_KEYS = ("name", "materials")
_MATERIAL_KEYS = ("name", "concentration")

# Bumped only together with a migration of every stored fingerprint.
_FINGERPRINT_TAG = b"formulary.fingerprint.v1\n"
# json.dumps with options builds an encoder per call; this one is made once.
_FINGERPRINT_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

# Valid addends have at most 9 significant digits (100.000000) and no more than
# 6 places, and 500 of them add up to at most 50000.000000, so 64 digits keeps
# every partial sum exact whatever the caller's own context says.
_SUM_CONTEXT = Context(prec=64)

# Whole numbers are written out in full (and canonical_json writes plain
# notation) only up to this exponent: beyond it "1e999999999" would grow to a
# gigabyte of digits.
_PLAIN_EXPONENT_LIMIT = 32

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Exactly the code points of Unicode general category Cc (a stable set).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_QUOTE_LIMIT = 40


@dataclass(frozen=True, slots=True)
class Material:
    """One ingredient: its name as submitted (trimmed) and its exact percentage."""

    name: str
    concentration: Decimal

    @property
    def key(self) -> str:
        """The material's identity key; see :func:`material_key`."""
        return material_key(self.name)

    def __reduce__(self) -> tuple[type[Material], tuple[str, Decimal]]:
        # Every submit pickles materials across the manager, twice: as a call
        # this is about three times cheaper than the slots-state default.
        return (Material, (self.name, self.concentration))


@dataclass(frozen=True, slots=True)
class FormulaDraft:
    """A valid formula, not yet stored: what the broker needs to store it."""

    name: str
    materials: tuple[Material, ...]
    fingerprint: str

    def __reduce__(self) -> tuple[type[FormulaDraft], tuple[str, tuple[Material, ...], str]]:
        return (FormulaDraft, (self.name, self.materials, self.fingerprint))


def validate_formula(document: object) -> FormulaDraft:
    """Check every rule of SPEC "Data" and build the draft.

    Every problem found is listed in one InvalidFormula, in document order,
    with the concentrations' sum last.
    """
    if not isinstance(document, dict):
        raise InvalidFormula((FieldError("body", f"must be a JSON object, not {_kind(document)}"),))
    errors: list[FieldError] = []
    _check_keys(document, "body", _FORMULA_KEYS, errors)
    name = _check_name(document["name"], "name", errors) if "name" in document else None
    materials: list[Material] = []
    keys: list[str] = []
    if "materials" in document:
        _check_materials(document["materials"], materials, keys, errors)
    if errors or name is None:
        raise InvalidFormula(tuple(errors))
    return FormulaDraft(
        name=name,
        materials=tuple(materials),
        fingerprint=_digest(zip(keys, (m.concentration for m in materials), strict=True)),
    )


def parse_formula(body: bytes) -> FormulaDraft:
    """:func:`parse_json`, then :func:`validate_formula`."""
    return validate_formula(parse_json(body))


def _check_keys(
    document: dict[object, object],
    path: str,
    expected: tuple[str, ...],
    errors: list[FieldError],
) -> None:
    if type(document) is dict and document.keys() == set(expected):
        return  # the usual case, without building three generators
    errors.extend(FieldError(path, f"repeats key {_quote(key)}") for key in repeated_keys(document))
    errors.extend(
        FieldError(path, f"has unknown key {_quote(key)}")
        for key in document
        if key not in expected
    )
    errors.extend(
        FieldError(_member_path(path, key), "is required")
        for key in expected
        if key not in document
    )


def _check_name(value: object, path: str, errors: list[FieldError]) -> str | None:
    """The trimmed name, or None after recording why it is not acceptable."""
    if not isinstance(value, str):
        errors.append(FieldError(path, f"must be a string, not {_kind(value)}"))
        return None
    found = len(errors)
    if _SURROGATE.search(value):
        errors.append(FieldError(path, "must not contain lone surrogates"))
    trimmed = value.strip()
    if not trimmed:
        errors.append(FieldError(path, "must not be empty or only whitespace"))
    elif len(trimmed) > MAX_NAME_LENGTH:
        errors.append(FieldError(path, f"must be at most {MAX_NAME_LENGTH} characters"))
    if _CONTROL.search(trimmed):
        errors.append(FieldError(path, "must not contain control characters"))
    return trimmed if len(errors) == found else None


def _check_concentration(value: object, path: str, errors: list[FieldError]) -> Decimal | None:
    """The canonical concentration, or None after recording why it is not acceptable."""
    # bool is an int subclass, and float would mean a caller skipped parse_json.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        errors.append(FieldError(path, f"must be a number, not {_kind(value)}"))
        return None
    number = Decimal(value) if isinstance(value, int) else value
    if not number.is_finite():
        errors.append(FieldError(path, "must be a finite number"))
        return None
    found = len(errors)
    canonical = canonical_decimal(number)
    if canonical <= _ZERO:
        errors.append(FieldError(path, "must be greater than 0"))
    elif canonical > _MAX_CONCENTRATION:
        errors.append(FieldError(path, f"must be at most {_MAX_CONCENTRATION}"))
    if -_exponent(canonical) > MAX_DECIMAL_PLACES:
        errors.append(FieldError(path, f"must have at most {MAX_DECIMAL_PLACES} decimal places"))
    return canonical if len(errors) == found else None


def _check_materials(
    value: object, materials: list[Material], keys: list[str], errors: list[FieldError]
) -> None:
    """Append the valid materials and their keys, and every problem found."""
    if not isinstance(value, list):
        errors.append(FieldError("materials", f"must be an array, not {_kind(value)}"))
        return
    if not value:
        errors.append(FieldError("materials", "must list at least 1 material"))
    elif len(value) > MAX_MATERIALS:
        errors.append(FieldError("materials", f"must list at most {MAX_MATERIALS} materials"))
    first_index: dict[str, int] = {}
    total = _ZERO
    for index, item in enumerate(value):
        path = f"materials[{index}]"
        if not isinstance(item, dict):
            errors.append(FieldError(path, f"must be an object, not {_kind(item)}"))
            continue
        _check_keys(item, path, _MATERIAL_KEYS, errors)
        name = _check_name(item["name"], f"{path}.name", errors) if "name" in item else None
        concentration = None
        if "concentration" in item:
            concentration = _check_concentration(
                item["concentration"], f"{path}.concentration", errors
            )
        key = ""
        if name is not None:
            key = material_key(name)
            first = first_index.setdefault(key, index)
            if first != index:
                errors.append(
                    FieldError(f"{path}.name", f"is the same material as materials[{first}]")
                )
        if concentration is not None:
            total = _SUM_CONTEXT.add(total, concentration)
        if name is not None and concentration is not None:
            materials.append(Material(name=name, concentration=concentration))
            keys.append(key)
    # Invalid concentrations are left out: any value that fixes one is
    # positive, so the total is a lower bound for every corrected body that
    # keeps these materials, and the error is worth reporting alongside.
    if total > _MAX_CONCENTRATION:
        errors.append(
            FieldError(
                "materials",
                f"concentrations add up to {decimal_text(total)}, more than {_MAX_CONCENTRATION}",
            )
        )


def _member_path(path: str, key: str) -> str:
    return key if path == "body" else f"{path}.{key}"


def _quote(key: object) -> str:
    # json.dumps escapes control characters and lone surrogates, so a message
    # always encodes as UTF-8 whatever the client sent as a key.
    text = key if isinstance(key, str) else repr(key)
    if len(text) > _QUOTE_LIMIT:
        return json.dumps(text[:_QUOTE_LIMIT]) + "..."
    return json.dumps(text)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float | Decimal):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def material_key(name: str) -> str:
    """A material's identity: NFKC, trimmed, inner whitespace runs as one space, casefolded.

    ``material_key(" bergamot  OIL") == material_key("Bergamot Oil")``.
    """
    # str.split() with no separator trims and collapses in one pass.
    return " ".join(unicodedata.normalize("NFKC", name).split()).casefold()


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise ValueError(f"{value} is not a finite number")
    return exponent


def canonical_decimal(value: Decimal) -> Decimal:
    """One representation per value: ``10``, ``10.0``, ``1e1``, ``10.000`` all give ``10``.

    Trailing zeros after the point are stripped and whole numbers get
    exponent 0, so ``str()`` of any valid concentration is plain notation.
    Whole numbers with more than 32 trailing zeros keep a positive exponent
    (``Decimal('1E+999999999')``) rather than growing that many digits.
    Unlike ``Decimal.normalize`` this never rounds to a context's precision,
    so a 40-digit value stays exact. Zero (either sign) becomes ``Decimal(0)``.
    Raises ValueError for NaN and Infinity.
    """
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"{value} is not a finite number")
    if digits[-1] != 0 and exponent <= 0:
        return value
    kept = len(bytes(digits).rstrip(b"\0"))  # digits are 0-9, so bytes() packs them in C
    if not kept:
        return _ZERO
    exponent += len(digits) - kept
    if 0 < exponent <= _PLAIN_EXPONENT_LIMIT:
        return Decimal((sign, digits[:kept] + (0,) * exponent, 0))
    return Decimal((sign, digits[:kept], exponent))


def decimal_text(value: Decimal) -> str:
    """Plain notation without exponent or trailing zeros: ``15.5``, ``10``, ``0.000001``.

    The text is as long as the value's digits and exponent, so keep it to
    values that passed validation (or see canonical_json for huge exponents).
    Raises ValueError for NaN and Infinity.
    """
    # Without a precision, "f" writes every digit of the coefficient and
    # never consults the context, so this is exact.
    return format(canonical_decimal(value), "f")


def fingerprint(materials: Iterable[Material]) -> str:
    """The SHA-256 (hex) of a formula's make-up: what makes two formulas the same.

    The hashed bytes are a version tag, then the UTF-8 JSON text of the
    ``[key, concentration]`` pairs, sorted, with concentrations in plain
    decimal notation. Nothing in it depends on the process or the Python
    version; a golden test pins the result.
    """
    return _digest((material.key, material.concentration) for material in materials)


def _digest(pairs: Iterable[tuple[str, Decimal]]) -> str:
    """The fingerprint of (material key, concentration) pairs; see :func:`fingerprint`."""
    encoded = sorted([key, decimal_text(concentration)] for key, concentration in pairs)
    payload = _FINGERPRINT_ENCODER.encode(encoded).encode("utf-8")
    return hashlib.sha256(_FINGERPRINT_TAG + payload).hexdigest()


def canonical_json(document: object) -> str:
    """One text for every document equal as parsed JSON.

    Keys sorted, no whitespace, strings ASCII-escaped (so lone surrogates
    survive), numbers by exact value (``1``, ``1.0`` and ``1e0`` all ``1``):
    plain while the exponent is small, ``<digits>E<exponent>`` beyond. Takes
    what parse_json returns (ints and Decimals as numbers); raises TypeError
    for other types and ValueError for NaN or Infinity. Recurses once per
    nesting level, which parse_json bounds by MAX_DEPTH.
    """
    parts: list[str] = []
    _write_canonical(document, parts)
    return "".join(parts)


def _write_canonical(value: object, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif isinstance(value, bool):
        parts.append("true" if value else "false")
    elif isinstance(value, int | Decimal):
        parts.append(_number_text(Decimal(value) if isinstance(value, int) else value))
    elif isinstance(value, str):
        parts.append(json.dumps(value))
    elif isinstance(value, list):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write_canonical(item, parts)
        parts.append("]")
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JSON object keys must be strings")
        parts.append("{")
        for index, key in enumerate(sorted(value)):
            if index:
                parts.append(",")
            parts.append(json.dumps(key))
            parts.append(":")
            _write_canonical(value[key], parts)
        parts.append("}")
    else:
        raise TypeError(f"{type(value).__name__} is not a parsed JSON value")


def _number_text(value: Decimal) -> str:
    canonical = canonical_decimal(value)
    sign, digits, exponent = canonical.as_tuple()
    assert isinstance(exponent, int)  # canonical_decimal refused the others
    if -_PLAIN_EXPONENT_LIMIT <= exponent <= _PLAIN_EXPONENT_LIMIT:
        return decimal_text(canonical)
    return f"{'-' if sign else ''}{''.join(map(str, digits))}E{exponent:+d}"
