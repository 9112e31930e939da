"""The PostgreSQL engine's SQL, read from the files beside this module.

``migrations/NNNN_name.sql`` build the schema one version at a time (tables,
indexes and the functions that make each atomic step); ``queries.sql`` holds
the named statements the engine runs, ``portable.sql`` those that copy a
whole deployment in or out (``broker.migrate``). Python code refers to a
query by name and never spells SQL itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

__all__ = ["Migration", "migrations", "query"]

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


_QUERY_FILES: Final = ("queries.sql", "portable.sql")


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
    """The statement named ``name`` in queries.sql or portable.sql."""
    return _queries()[name]
