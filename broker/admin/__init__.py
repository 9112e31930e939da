"""The broker's admin socket: a line protocol for operators (``socat``, ``nc -U``).

Three parts, each usable alone: :mod:`~broker.admin.protocol` (framing),
:mod:`~broker.admin.commands` (one method per command, plain data back) and
:mod:`~broker.admin.server` (the owner-only Unix socket and its threads).
``python -m broker.admin COMMAND`` is the command-line client.
"""

from __future__ import annotations

from broker.admin.commands import COMMANDS, AdminCommands, CommandError
from broker.admin.protocol import (
    MAX_LINE_BYTES,
    LineSplitter,
    ProtocolError,
    TooLong,
    decode_line,
    encode_reply,
    error_reply,
    parse_command,
)
from broker.admin.server import AdminServer, AdminSocketBusy

__all__ = [
    "COMMANDS",
    "MAX_LINE_BYTES",
    "AdminCommands",
    "AdminServer",
    "AdminSocketBusy",
    "CommandError",
    "LineSplitter",
    "ProtocolError",
    "TooLong",
    "decode_line",
    "encode_reply",
    "error_reply",
    "parse_command",
]
