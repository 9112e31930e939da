"""The admin socket's framing: text lines in, one JSON document per line out.

A request is one line of UTF-8 text ending in ``\\n`` (a ``\\r`` before it is
dropped, so ``nc -C`` and telnet work too): a command word and its arguments,
separated by whitespace. A reply is one compact JSON object on one line,
always with ``"ok"``; an error reply is ``{"ok": false, "error": "..."}``.

A line longer than :data:`MAX_LINE_BYTES` is answered with a "line too long"
error as soon as the limit is passed, and its remaining bytes are skipped up
to the next newline, so a client's buffer never grows past the limit. Blank
lines get no reply. Nothing here touches a socket: :class:`LineSplitter`
turns received chunks into lines and the functions translate text.

Cost: each received byte is scanned once for a newline and copied at most
twice; a reply is encoded in time linear in its size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import simplejson

MAX_LINE_BYTES: Final = 4096
"""Longest request line accepted, not counting its line ending."""

LINE_TOO_LONG: Final = "line too long"
INVALID_UTF8: Final = "the line is not valid UTF-8"

Reply: TypeAlias = dict[str, Any]


class ProtocolError(ValueError):
    """A request line that cannot be read; the message is what the client is told."""


@dataclass(frozen=True, slots=True)
class TooLong:
    """Stands in for a line that went over the limit (its bytes are dropped)."""

    limit: int


Frame: TypeAlias = bytes | TooLong
"""What :meth:`LineSplitter.feed` yields: a line without its ending, or :class:`TooLong`."""


class LineSplitter:
    """Cuts a byte stream into lines of at most ``max_bytes``; holds at most that much.

    ``feed`` returns the frames completed by a chunk, in order. An over-long
    line yields one :class:`TooLong` the moment it passes the limit (not when
    its newline finally arrives) and is skipped up to its newline.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self._max = max_bytes
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline == -1:
                self._keep(chunk[start:], frames)
                return frames
            begin, start = start, newline + 1
            if self._skipping:
                self._skipping = False
                continue
            # Measured before copying, so an over-long line is never buffered.
            if len(self._buffer) + newline - begin > self._max + 1:
                frames.append(TooLong(self._max))
            else:
                line = _strip_cr(bytes(self._buffer) + chunk[begin:newline])
                frames.append(TooLong(self._max) if len(line) > self._max else line)
            self._buffer.clear()

    def finish(self) -> Frame | None:
        """The unterminated last line at end of stream, if any (``printf cmd | nc -U``)."""
        if self._skipping or not self._buffer:
            return None
        line = _strip_cr(bytes(self._buffer))
        self._buffer.clear()
        return TooLong(self._max) if len(line) > self._max else line

    def _keep(self, rest: bytes, frames: list[Frame]) -> None:
        if self._skipping:
            return
        # One byte of slack: the line may yet end in "\r\n".
        if len(self._buffer) + len(rest) > self._max + 1:
            self._buffer.clear()
            self._skipping = True
            frames.append(TooLong(self._max))
        else:
            self._buffer += rest


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def decode_line(line: bytes) -> str:
    """The line's text; raises :class:`ProtocolError` if it is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_UTF8) from None


def parse_command(text: str) -> tuple[str, list[str]]:
    """``"DEAD 10"`` -> ``("dead", ["10"])``: the command lower-cased, arguments as typed.

    Raises :class:`ProtocolError` for a blank line.
    """
    words = text.split()
    if not words:
        raise ProtocolError("empty command")
    return words[0].lower(), words[1:]


def is_blank(line: bytes) -> bool:
    return not line.strip()


def ok_reply(**fields: Any) -> Reply:
    return {"ok": True, **fields}


def error_reply(message: str) -> Reply:
    return {"ok": False, "error": message}


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """One reply line: compact JSON, exact decimals (``15.5``, never a float), ``\\n``.

    Raises ``TypeError`` for a value JSON cannot hold.
    """
    text: str = simplejson.dumps(
        reply, use_decimal=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form; escaped JSON carries it losslessly.
        escaped: str = simplejson.dumps(
            reply, use_decimal=True, separators=(",", ":"), allow_nan=False
        )
        return escaped.encode("ascii") + b"\n"
