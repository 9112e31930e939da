"""Strict JSON reading: a request body's bytes in, plain JSON values out.

:func:`parse_json` accepts one JSON text in strict UTF-8, at most
:data:`MAX_BODY_BYTES` bytes and nested at most :data:`MAX_DEPTH` levels deep,
and gives dicts, lists, strings, ``True``/``False``/``None`` and every number
(integers too) as an exact :class:`~decimal.Decimal`. It refuses everything
else as a whole with :class:`~broker.errors.InvalidFormula` carrying one
``body`` error: a larger body, bytes that are not UTF-8, an empty body,
deeper nesting, text ``json`` refuses, ``NaN`` and ``Infinity``, exponents
beyond the decimal module's range. Repeated keys are not refused: the last
value wins and :func:`repeated_keys` names them, so the caller can report
them at the object's path.

Cost: linear in the size of the body. The depth check runs only when the
text has more than :data:`MAX_DEPTH` opening brackets, and is two
regular-expression passes and a running sum, so nothing recurses deeper than
:data:`MAX_DEPTH`; numbers have no digit limit, and a Decimal costs time
linear in its digits.
"""

from __future__ import annotations

import json
import re
from decimal import Context, Decimal, InvalidOperation
from itertools import accumulate

from broker.errors import FieldError, InvalidFormula

MAX_BODY_BYTES = 65536
MAX_DEPTH = 32

# Only InvalidOperation matters here: it is how the Decimal constructor
# refuses an exponent beyond what the decimal module can hold. Passing this
# context explicitly keeps the caller's thread context (which might not trap,
# and would then hand back NaN) out of parsing.
_NUMBER_CONTEXT = Context(traps=[InvalidOperation])

# A JSON string with its escapes. The closing quote is optional so that an
# unterminated string ends the match rather than failing it: a failure would
# make the engine retry from every later quote, which is quadratic.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}

_JSON_WHITESPACE = " \t\n\r"


class _Rejected(Exception):
    """A problem found inside a ``json.loads`` callback, carried out to parse_json."""


class _Object(dict[str, object]):
    """A JSON object whose text repeated keys.

    ``json.loads`` has no path to report them at, so they ride along on the
    object (last value wins, as in ``json``) until :func:`repeated_keys` hands
    them to whoever meets the object. Objects without repeats stay plain dicts.
    """

    __slots__ = ("duplicates",)

    def __init__(self, pairs: list[tuple[str, object]], duplicates: tuple[str, ...]) -> None:
        super().__init__(pairs)
        self.duplicates = duplicates


def _make_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document = dict(pairs)
    if len(document) == len(pairs):
        return document
    seen: set[str] = set()
    duplicates: dict[str, None] = {}  # ordered set: each repeated key once
    for key, _ in pairs:
        if key in seen:
            duplicates[key] = None
        seen.add(key)
    return _Object(pairs, tuple(duplicates))


def repeated_keys(value: object) -> tuple[str, ...]:
    """The keys an object's JSON text repeated, each once, in order; else ``()``.

    Only objects from :func:`parse_json` can have any; a dict built in
    Python, or any other value, gives ``()``.
    """
    return value.duplicates if isinstance(value, _Object) else ()


def _parse_number(text: str) -> Decimal:
    try:
        return Decimal(text, _NUMBER_CONTEXT)
    except InvalidOperation:
        raise _Rejected("has a number whose exponent is out of range") from None


def _reject_constant(name: str) -> object:
    raise _Rejected(f"{name} is not a JSON number")


def _body_error(message: str) -> InvalidFormula:
    return InvalidFormula((FieldError("body", message),))


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside strings; linear, never recursive.

    For invalid JSON the figure may be off, but json.loads then stops at the
    first bad token before it has nested any deeper than the text up to it.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(body: bytes) -> object:
    """Parse a request body into JSON values, every number an exact Decimal.

    Objects are dicts, arrays lists, numbers Decimals (integers too, so no
    digit limit applies), and ``true``/``false``/``null`` bools and None.
    Repeated keys are not an error here: :func:`repeated_keys` names them
    (``broker.formula.validate_formula`` reports them at the object's path).
    Anything else wrong (more than MAX_BODY_BYTES, not strict UTF-8, empty,
    nested deeper than MAX_DEPTH, not JSON, ``NaN`` or ``Infinity``, an
    exponent out of range) raises InvalidFormula with one ``body`` error. No
    other exception escapes, whatever the bytes.
    """
    if len(body) > MAX_BODY_BYTES:
        raise _body_error(f"is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _body_error(f"is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip(_JSON_WHITESPACE):
        raise _body_error("is empty")
    # Fewer opening brackets than the limit, in strings or not, cannot nest
    # past it: the usual body skips the scan.
    openings = text.count("[") + text.count("{")
    if openings > MAX_DEPTH and _nesting_depth(text) > MAX_DEPTH:
        raise _body_error(f"is nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(
            text,
            parse_float=_parse_number,
            parse_int=_parse_number,
            parse_constant=_reject_constant,
            object_pairs_hook=_make_object,
        )
    except _Rejected as exc:
        raise _body_error(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise _body_error(
            f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, ArithmeticError, RecursionError):
        # Not expected after the checks above; kept so that a surprise in
        # the json module still becomes a 400 rather than a 500.
        raise _body_error("is not valid JSON") from None
