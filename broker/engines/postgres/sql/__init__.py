"""The PostgreSQL engine's SQL, read from the files beside this module.

``migrations/NNNN_name.sql`` build the schema one version at a time (tables,
indexes, data); ``functions.sql`` holds every function (the atomic steps),
applied whenever its checksum changes; ``queries.sql`` holds the named
statements the engine runs, ``portable.sql`` those that copy a whole
deployment in or out (``broker.migrate``), ``bookkeeping.sql`` those the
migration runner runs. Python code refers to a query by name and never
spells SQL itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

__all__ = ["Functions", "Migration", "functions", "migrations", "query"]

HERE: Final = Path(__file__).parent
_NAME: Final = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION: Final = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration, oldest first; versions run 1, 2, 3... without gaps."""
    found = []
    for path in sorted((HERE / "migrations").iterdir()):
        match = _MIGRATION.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations in {HERE / 'migrations'} are not numbered 1, 2, 3...")
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Functions:
    """``functions.sql``: its text, and the SHA-256 (hex) of it that the database records."""

    file: str
    sql: str
    checksum: str

    @classmethod
    def of(cls, file: str, sql: str) -> Functions:
        return cls(file, sql, hashlib.sha256(sql.encode("utf-8")).hexdigest())


@cache
def functions() -> Functions:
    """Every function of the schema, as ``functions.sql`` makes them."""
    return Functions.of("functions.sql", (HERE / "functions.sql").read_text(encoding="utf-8"))


_QUERY_FILES: Final = ("queries.sql", "portable.sql", "bookkeeping.sql")


@cache
def _queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for file in _QUERY_FILES:
        parts = _NAME.split((HERE / file).read_text(encoding="utf-8"))
        # parts: [preamble, name, body, name, body, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"the query {name!r} is named twice (again in {file})")
            found[name] = body.strip()
    return found


def query(name: str) -> str:
    """The statement named ``name`` in one of the query files."""
    return _queries()[name]
