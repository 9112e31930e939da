"""What a peers run compares and with which settings: the servers, the scenarios, ``Config``.

Every part of the comparison needs these: ``bench.peers_servers`` starts the
servers defined here, ``bench.peers_report`` tabulates them, and
``bench.peers`` (the entry point) parses the settings from the command line.
They live apart from all three so each can import them without importing
back from the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.load import Generator

SAME_BODY = b'{"name":"Peers duplicate","materials":[{"name":"Peers Rose","concentration":1}]}'

# scenario key -> what it sends
SCENARIOS = {"new": "new make-up", "same": "same make-up"}


@dataclass(frozen=True)
class ServerDef:
    key: str
    title: str
    needs: tuple[str, ...]  # "flask", "redis-py", "redis-server"
    expected_same: str = "409"


SERVERS = (
    ServerDef("noop", "no-op Falcon (2 x gthread 4)", (), expected_same="202"),
    ServerDef("seed", "single-process Flask plan (1 sync)", ("flask",)),
    ServerDef(
        "redis_nofsync",
        "Flask + Redis, `--appendonly no` (2 x gthread 4)",
        ("flask", "redis-py", "redis-server"),
    ),
    ServerDef(
        "redis_fsync",
        "Flask + Redis, `appendfsync always` (2 x gthread 4)",
        ("flask", "redis-py", "redis-server"),
    ),
    ServerDef("formulary", "Formulary, SQLite journal (its own gunicorn.conf.py)", ()),
    ServerDef("formulary_memory", "Formulary, `FORMULARY_DATA=:memory:`", ()),
)
BY_KEY = {s.key: s for s in SERVERS}


@dataclass(frozen=True)
class Config:
    seconds: float
    rounds: int
    warmup: float
    connections: int
    threads: int
    servers: tuple[str, ...]
    peers_dir: Path
    generator: Generator
    out: Path
