"""What every engine does the same way: new ids, and a handler's summary as JSON text."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import simplejson

from broker.errors import InvalidCursor

__all__ = ["decode_cursor", "encode_cursor", "new_id", "pack_summary", "unpack_summary"]


def new_id() -> str:
    """Opaque, unguessable, URL-safe: 128 random bits in 22 characters."""
    return secrets.token_urlsafe(16)


def pack_summary(summary: Mapping[str, Any]) -> str:
    """A handler's summary as compact JSON; ``Decimal`` figures keep their exact digits.

    Raises ``TypeError`` or ``ValueError`` for anything JSON cannot hold.
    """
    text: str = _SUMMARY_ENCODER.encode(dict(summary))
    return text


def unpack_summary(text: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return summary


_SUMMARY_ENCODER = simplejson.JSONEncoder(use_decimal=True, separators=(",", ":"), allow_nan=False)


def encode_cursor(position: int) -> str:
    """A listing cursor: an opaque spelling of the last listed formula's position."""
    return base64.urlsafe_b64encode(f"s{position}".encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> int:
    """The position ``cursor`` spells; ``InvalidCursor`` if ``encode_cursor`` never made it."""
    if len(cursor) > _MAX_CURSOR:
        raise InvalidCursor(cursor[:_MAX_CURSOR])
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        text = raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(cursor) from None
    if not text.startswith("s") or not text[1:].isdigit():
        raise InvalidCursor(cursor)
    position = int(text[1:])
    if position < 1 or encode_cursor(position) != cursor:
        raise InvalidCursor(cursor)
    return position


# Far longer than any position can reach: refusing longer ones keeps int()
# off arbitrarily long digit strings.
_MAX_CURSOR = 32
