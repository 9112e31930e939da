"""What every part of the soak shares: its settings, the error that stops it, a page size.

They live apart from ``bench.soak`` (the entry point, which parses the
settings from the command line) so the parts can import them without
importing back from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAGE = 500  # formulas per read: the read-back's listing pages, the recovery check's batches


class SoakError(RuntimeError):
    """The soak cannot carry on (the stack is broken beyond what it measures)."""


@dataclass(frozen=True)
class Config:
    seconds: float
    clients: int
    consumers: int
    seed: int
    lease: float
    submit_deadline: float
    settle_timeout: float
    out: Path
    keep_logs: bool
    engine: str = "embedded"  # or "postgres": a throwaway PostgreSQL server for the run
