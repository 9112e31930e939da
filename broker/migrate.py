"""``python -m broker.migrate SOURCE TARGET``: copy a whole deployment from one engine to another.

SOURCE and TARGET are FORMULARY_DATA values: a journal file (the embedded
engine) or a postgresql:// URI (the PostgreSQL engine; a password only
through PGPASSWORD or ~/.pgpass), in any pairing. :memory: is refused on
either side: it has nothing to copy, and keeps nothing copied into it.

Stop every broker of both deployments first, and start the new ones on
TARGET when the copy is done. An embedded journal has a single writer: the
copy cannot open one a broker holds. A PostgreSQL source is read as one
consistent snapshot (a REPEATABLE READ, read-only transaction): whatever a
broker writes after it began is not copied. A PostgreSQL target is locked
while it is filled.

What is copied: every formula with its state (ids, name, materials,
fingerprint, message id, created_at, deliveries, processed_at, summary); the
idempotency keys that have not expired, with their expiry; every
unacknowledged message with its delivery count (one leased or delayed at
the source is ready at the target, as after a broker restart); the dead
letters, dead still, in their order; every API key, revoked or not, with its
name, scopes, times and the digest of its secret. Ids stay the same, so
clients' ids and Locations keep working, and so do their API keys' secrets
(each idempotency key stays its API key's).

The target must be empty: a missing journal file is created, a database
gets its schema. The copy is one transaction, so a failed or interrupted run
leaves the target empty, and can simply be run again. Progress goes to
stderr.

Exit status: 0 done; 1 refused (the target is not empty, :memory:, bad
arguments); 3 a source or target that cannot be used (unreadable, a newer
schema, records the target cannot take); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final, NoReturn, TextIO, TypeVar

from broker.engines import POSTGRESQL_SCHEMES, EngineError
from broker.engines.portable import (
    Holdings,
    Records,
    Refused,
    Source,
    Target,
    open_source,
    open_target,
)
from broker.settings import LOG_FORMAT

__all__ = [
    "EXIT_DONE",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_UNUSABLE",
    "Progress",
    "copy",
    "main",
]

EXIT_DONE: Final = 0
EXIT_REFUSED: Final = 1
"""Nothing copied: the target is not empty, :memory:, or bad arguments."""
EXIT_UNUSABLE: Final = 3
"""Nothing copied: the source or the target cannot be used; the message says why."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C: nothing was kept at the target."""

BATCH: Final = 5_000
"""Records read and written at a time."""

T = TypeVar("T")


# -- progress -----------------------------------------------------------------------------


class Progress:
    """What the copy is doing, for people: one line per phase on ``stream``.

    On a terminal a phase's line is rewritten in place (``\\r``) as batches
    go by, at most every ``interval`` seconds; elsewhere (a pipe, a log file)
    it is written once, when the phase ends.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.2,
    ) -> None:
        self._stream = stream
        self._live = stream.isatty() if live is None else live
        self._clock = clock
        self._interval = interval
        self._width = 0

    def say(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def track(self, what: str, total: int, batches: Iterable[Sequence[T]]) -> Iterator[Sequence[T]]:
        """``batches`` as they are, counted as the consumer asks for the next one."""
        started = shown = self._clock()
        done = 0
        if self._live:
            self._show(f"{what}: 0 of {total:,}")
        for batch in batches:
            yield batch
            done += len(batch)
            now = self._clock()
            if self._live and now - shown >= self._interval:
                shown = now
                percent = f" ({100 * done // total}%)" if total else ""
                self._show(f"{what}: {done:,} of {total:,}{percent}, {_rate(done, now - started)}")
        elapsed = self._clock() - started
        line = f"{what}: {done:,} of {total:,} in {elapsed:.1f}s ({_rate(done, elapsed)})"
        if self._live:
            self._show(line)
            self._stream.write("\n")
            self._width = 0
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def _show(self, line: str) -> None:
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)


def _rate(done: int, seconds: float) -> str:
    return f"{done / seconds:,.0f}/s" if seconds > 0 else "-/s"


# -- the copy -----------------------------------------------------------------------------


def copy(source: Source, target: Target, progress: Progress, *, batch: int = BATCH) -> Holdings:
    """Copy everything ``source`` holds into the empty ``target``; returns what was copied."""
    target.holdings().require_empty(target.where)
    holdings = replace(source.holdings(), expired_keys=0)
    progress.say(f"copying {source.where} -> {target.where}: {holdings}")
    target.import_all(
        Records(
            formulas=progress.track("formulas", holdings.formulas, source.formulas(batch)),
            keys=progress.track("idempotency keys", holdings.keys, source.keys(batch)),
            messages=progress.track("messages", holdings.messages, source.messages(batch)),
            api_keys=progress.track("API keys", holdings.api_keys, source.api_keys(batch)),
        )
    )
    return holdings


# -- the command line -------------------------------------------------------------------


class UsageError(Exception):
    """The command line cannot be used; the message says why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m broker.migrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="FORMULARY_DATA to copy from: a journal file or a URI")
    parser.add_argument("target", help="FORMULARY_DATA to copy into (empty): a file or a URI")
    return parser


def main(argv: Sequence[str] | None = None, *, stderr: TextIO | None = None) -> int:
    """Run the copy the command line asks for; returns the exit status."""
    out = sys.stderr if stderr is None else stderr
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        out.write(f"{parser.format_usage()}{parser.prog}: error: {exc}\n")
        return EXIT_REFUSED
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    source_data, target_data = args.source, args.target
    progress = Progress(out)
    started = time.monotonic()
    try:
        if _same(source_data, target_data):
            raise Refused("the source and the target are the same")
        with contextlib.ExitStack() as closing:
            source = open_source(source_data)
            closing.callback(source.close)
            target = open_target(target_data)
            closing.callback(target.close)
            copied = copy(source, target, progress)
    except Refused as exc:
        out.write(f"refused: {exc}; nothing was copied\n")
        return EXIT_REFUSED
    except EngineError as exc:
        out.write(f"cannot copy: {exc}\n")
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        out.write("\ninterrupted: nothing was kept at the target; run the copy again\n")
        return EXIT_INTERRUPTED
    progress.say(f"done in {time.monotonic() - started:.1f}s: copied {copied}")
    return EXIT_DONE


def _same(source: str, target: str) -> bool:
    if source == target:
        return True
    if source.startswith(POSTGRESQL_SCHEMES) or target.startswith(POSTGRESQL_SCHEMES):
        return False
    return Path(source).resolve() == Path(target).resolve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    sys.exit(main())
