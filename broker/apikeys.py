"""API keys as both sides spell them: scopes, the secret's form, and its digest.

A secret reads ``fmk.<key id>.<43 random characters>``: the id lets the broker
find the key's record at once, and the rest carries 256 random bits. The
broker keeps only the secret's SHA-256 (a fast hash is enough for a secret
that random; nothing can be guessed from it) and compares digests in
constant time. The API hashes the bearer token before it asks the broker,
so a secret never crosses to the broker except the once it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from collections.abc import Iterable
from typing import Final

__all__ = [
    "DEFAULT_SCOPES",
    "METRICS",
    "READ",
    "SCOPES",
    "SUBMIT",
    "digest",
    "matches",
    "new_key_id",
    "new_secret",
    "parse_name",
    "parse_scopes",
    "parse_secret",
]

SUBMIT: Final = "submit"
READ: Final = "read"
METRICS: Final = "metrics"
SCOPES: Final = (SUBMIT, READ, METRICS)
DEFAULT_SCOPES: Final = (SUBMIT, READ)

_PREFIX: Final = "fmk"
_SECRET: Final = re.compile(r"^fmk\.([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{43})$")
MAX_NAME: Final = 100


def new_key_id() -> str:
    """Short, unguessable enough to be no help, and safe in a URL or a log."""
    return secrets.token_urlsafe(9)


def new_secret(key_id: str) -> str:
    return f"{_PREFIX}.{key_id}.{secrets.token_urlsafe(32)}"


def digest(secret: str) -> str:
    """What the broker keeps of a secret, and what the API sends to check one."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_secret(token: str) -> tuple[str, str] | None:
    """``(key id, digest)`` of a well-formed secret; None for anything else."""
    match = _SECRET.match(token)
    if match is None:
        return None
    return match[1], digest(token)


def matches(stored_digest: str, offered_digest: str) -> bool:
    """Constant-time: how long this takes says nothing about how much matched."""
    return hmac.compare_digest(stored_digest.encode("ascii"), offered_digest.encode("ascii"))


def parse_scopes(words: Iterable[str]) -> tuple[str, ...]:
    """Known scopes in their canonical order; ``ValueError`` names an unknown one."""
    wanted = {word.strip().lower() for word in words if word.strip()}
    unknown = wanted - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope {sorted(unknown)[0]!r}: scopes are {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in wanted)


def parse_name(name: str) -> str:
    """A key's name as kept: trimmed, 1 to ``MAX_NAME`` characters, no control characters
    or lone surrogates; ``ValueError`` says what is wrong."""
    if not isinstance(name, str):
        raise ValueError("a key's name must be text")
    trimmed = name.strip()
    if not trimmed:
        raise ValueError("a key needs a name")
    if len(trimmed) > MAX_NAME:
        raise ValueError(f"a key's name is at most {MAX_NAME} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in trimmed):
        raise ValueError("a key's name may not hold control characters")
    return trimmed
