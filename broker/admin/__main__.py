"""``python -m broker.admin COMMAND [ARGS...]``: ask the running broker over its admin socket.

Sends one command line, reads one reply line, and prints it for people (or
as the raw JSON with ``--json``). Commands: ping, stats, show ID, dead [N],
redrive ID|all, key create NAME [SCOPE,...], key list, key revoke ID, help.
Options may go anywhere; every other word is the command or one of its
arguments, so an id that starts with "-" needs nothing special.

``key create`` prints the new key's secret on a line of its own: it is shown
this once and never again (the broker keeps only its hash).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TextIO

from broker.settings import Settings, SettingsError

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
"""The broker answered ``{"ok": false, ...}``."""
EXIT_USAGE: Final = 2
"""Bad command line, bad settings, or the admin socket cannot be reached."""

DEFAULT_TIMEOUT: Final = 30.0
RECV_BYTES: Final = 65536


class Unreachable(Exception):
    """No answer from the admin socket; the message says why, for people."""


FLAGS: Final = frozenset({"--json", "-h", "--help"})
VALUED: Final = frozenset({"--socket", "--timeout"})


def options_first(argv: Sequence[str]) -> list[str]:
    """Move this CLI's own options ahead of ``--`` and every other word after it.

    Ids are base64url, so one in 64 starts with "-": argparse alone would take
    ``show -5XIE...`` for an unknown option.
    """
    options: list[str] = []
    words: list[str] = []
    rest = iter(argv)
    for word in rest:
        if word == "--":
            words.extend(rest)
        elif word in FLAGS or word.partition("=")[0] in VALUED:
            options.append(word)
            if word in VALUED:  # "--socket PATH": the value is the next word, whatever it is
                options.extend(itertools.islice(rest, 1))
        else:
            words.append(word)
    return [*options, "--", *words]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m broker.admin", description=__doc__)
    parser.add_argument("command", help="ping, stats, show, dead, redrive, key or help")
    parser.add_argument("args", nargs="*", help="the command's arguments")
    parser.add_argument("--json", action="store_true", help="print the reply as raw JSON")
    parser.add_argument(
        "--socket", type=Path, help="admin socket path (default: FORMULARY_ADMIN_SOCKET)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the reply (default {DEFAULT_TIMEOUT:g})",
    )
    return parser.parse_args(options_first(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    words = [args.command, *args.args]
    # The protocol splits on whitespace: a newline in an argument would be a second command.
    if any(not word or any(c.isspace() for c in word) for word in words):
        print(
            "broker.admin: arguments must be non-empty and contain no whitespace", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        path = args.socket if args.socket is not None else Settings.from_env().admin_socket
    except SettingsError as exc:
        print(f"broker.admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        raw = request(path, " ".join(words), args.timeout)
        reply = json.loads(raw, parse_float=Decimal)
    except Unreachable as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ValueError:
        print(f"the admin socket at {path} answered something other than JSON", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(reply, dict):
        print(
            f"the admin socket at {path} answered something other than an object", file=sys.stderr
        )
        return EXIT_USAGE
    ok = reply.get("ok") is True
    if args.json:
        print(raw.decode("utf-8").rstrip("\r\n"), file=out)
    elif ok:
        for line in render(args.command.lower(), reply, args.args):
            print(line, file=out)
    else:
        print(f"error: {reply.get('error', 'unknown error')}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_REFUSED


def request(path: Path, line: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send one command line to the admin socket at ``path``; return the reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise Unreachable(
                f"cannot reach the admin socket at {path}: is the broker running? ({reason})"
            ) from None
        try:
            # Refused at once (too many clients), its reply may still be waiting.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line.encode("utf-8") + b"\n")
            return _read_line(sock, path)
        except TimeoutError:
            raise Unreachable(
                f"no answer from the admin socket at {path} within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise Unreachable(f"the admin socket at {path} failed: {exc}") from None


def _read_line(sock: socket.socket, path: Path) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            if chunks:
                return b"".join(chunks)
            raise Unreachable(f"the admin socket at {path} hung up without answering")
        chunks.append(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]


# -- for people ------------------------------------------------------------------


def render(command: str, reply: Mapping[str, Any], args: Sequence[str] = ()) -> list[str]:
    """The lines to print for a successful reply to ``command`` with ``args``."""
    fields = {k: v for k, v in reply.items() if k != "ok"}
    if command == "ping":
        return ["pong"]
    if command == "show":
        return _show(fields)
    if command == "dead":
        return _dead(fields.get("dead", []))
    if command == "key":
        return _key(args[0].lower() if args else "", args[1:], fields)
    if command == "help":
        return [str(text) for text in fields.get("commands", {}).values()]
    return _columns(fields.items())


def _show(fields: Mapping[str, Any]) -> list[str]:
    formula = dict(fields.get("formula") or {})
    materials = formula.pop("materials", [])
    summary = formula.pop("summary", None)
    lines = _labelled(formula.items())
    lines.append("materials:")
    lines += _columns(((m["name"], m["concentration"]) for m in materials), indent="  ")
    if summary:
        lines.append("summary:")
        lines += _labelled(summary.items(), indent="  ")
    else:
        lines.append("summary: -")
    message = fields.get("message")
    if message is None:
        lines.append("message: gone (acknowledged)")
    else:
        lines.append("message:")
        lines += _labelled(message.items(), indent="  ")
    return lines


def _dead(letters: list[Mapping[str, Any]]) -> list[str]:
    if not letters:
        return ["no dead letters"]
    header = ("message_id", "formula_id", "deliveries")
    rows = [
        header,
        *((str(d["message_id"]), str(d["formula_id"]), _text(d["deliveries"])) for d in letters),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]


def _key(verb: str, args: Sequence[str], fields: Mapping[str, Any]) -> list[str]:
    if verb == "create":
        shown = [(k, fields.get(k)) for k in ("id", "name")]
        return [
            *_labelled([*shown, ("scopes", ",".join(fields.get("scopes", [])))]),
            "secret (shown this once, never again: keep it now; the broker keeps only its hash):",
            str(fields.get("secret")),
        ]
    if verb == "list":
        return _keys(fields.get("keys", []))
    if verb == "revoke" and args:
        return [f"revoked API key {args[0]}"]
    return _columns(fields.items())


def _keys(keys: list[Mapping[str, Any]]) -> list[str]:
    if not keys:
        return ["no API keys"]
    header = ("id", "name", "scopes", "created_at", "revoked_at")
    rows = [
        header,
        *(
            (
                str(k["id"]),
                str(k["name"]),
                ",".join(k["scopes"]),
                str(k["created_at"]),
                _text(k["revoked_at"]),
            )
            for k in keys
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def _columns(pairs: Iterable[tuple[Any, Any]], indent: str = "") -> list[str]:
    """``name  value`` rows with the values aligned."""
    rows = [(str(k), _text(v)) for k, v in pairs]
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def _labelled(pairs: Iterable[tuple[Any, Any]], indent: str = "") -> list[str]:
    """``key: value`` lines with the values aligned."""
    rows = [(f"{k}:", _text(v)) for k, v in pairs]
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}} {v}" for k, v in rows]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal | int | str):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
