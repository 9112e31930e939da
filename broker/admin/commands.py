"""The admin commands: one method per command, each returning plain data.

:class:`AdminCommands` knows nothing of sockets. Each command method takes its
arguments as the strings typed and returns a reply dict ready for
:func:`broker.admin.protocol.encode_reply`, or raises :class:`CommandError` or
a domain error; :meth:`AdminCommands.dispatch` turns a whole line into a reply
and never raises.

Every command is one or two calls on the broker (``OperatorBroker``), so each
costs what those calls cost in the engine; ``dead N`` is O(N), ``key list``
O(keys).

``key create``'s reply is the only place an API key's secret ever appears:
nothing here logs a reply, and a failing command is logged by its line,
which holds no secret.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Final

from broker.admin.protocol import ProtocolError, Reply, error_reply, ok_reply, parse_command
from broker.apikeys import DEFAULT_SCOPES
from broker.errors import ApiKeyNotFound, FormulaNotFound, FormularyError, MessageNotFound
from broker.interface import MessageInfo, OperatorBroker, rfc3339

log = logging.getLogger(__name__)

DEFAULT_DEAD: Final = 100
MAX_DEAD: Final = 10_000
"""Most dead letters one reply lists (a reply is a single line)."""

_COUNT: Final = re.compile(r"[0-9]{1,9}")


class CommandError(Exception):
    """A command that cannot run as typed; the message is what the client is told."""


# name -> (usage, one-line description, fewest arguments, most arguments)
COMMANDS: Final[dict[str, tuple[str, str, int, int]]] = {
    "ping": ("ping", "check that the broker answers", 0, 0),
    "stats": ("stats", "queue gauges (depth, in_flight, delayed, dead, formulas) and totals", 0, 0),
    "show": ("show ID", "a formula (by formula or message id) with its message state", 1, 1),
    "dead": ("dead [N]", f"the N oldest dead letters (default {DEFAULT_DEAD})", 0, 1),
    "redrive": ("redrive ID|all", "send a dead letter (or all of them) back to the queue", 1, 1),
    "key": ("key create|list|revoke ...", "manage API keys (see key create, list, revoke)", 1, 3),
    "help": ("help", "this list", 0, 0),
}

# key's own commands, described the same way (fewest and most count the words after it).
KEY_COMMANDS: Final[dict[str, tuple[str, str, int, int]]] = {
    "create": (
        "key create NAME [SCOPE,...]",
        f"make an API key with these scopes (default {','.join(DEFAULT_SCOPES)}); "
        "its secret is in this reply only",
        1,
        2,
    ),
    "list": ("key list", "every API key, revoked ones included (never a secret)", 0, 0),
    "revoke": ("key revoke ID", "revoke an API key, everywhere within 2 seconds", 1, 1),
}


class AdminCommands:
    """The admin socket's commands, run against ``broker``."""

    def __init__(self, broker: OperatorBroker) -> None:
        self._broker = broker

    def dispatch(self, line: str) -> Reply:
        """Run one command line; every failure becomes an error reply, never an exception."""
        try:
            name, args = parse_command(line)
            if name not in COMMANDS:
                raise CommandError(f"unknown command {_shown(name)}; try help")
            usage, _, fewest, most = COMMANDS[name]
            if not fewest <= len(args) <= most:
                raise CommandError(f"usage: {usage}")
            method: Callable[..., Reply] = getattr(self, name)
            return method(*args)
        except (ProtocolError, CommandError) as exc:
            return error_reply(str(exc))
        except FormularyError as exc:
            return error_reply(_describe(exc))
        except Exception as exc:
            log.exception("admin command %r failed", line[:200])
            return error_reply(f"internal error: {type(exc).__name__}")

    def ping(self) -> Reply:
        return ok_reply(pong=self._broker.ping())

    def stats(self) -> Reply:
        return ok_reply(**asdict(self._broker.stats()))

    def show(self, some_id: str) -> Reply:
        """The formula with ``some_id``, or the one whose message has that id."""
        info: MessageInfo | None
        try:
            formula = self._broker.get_formula(some_id)
        except FormulaNotFound:
            try:
                info = self._broker.message_info(some_id)
            except MessageNotFound:
                raise CommandError(f"no formula or message has id {_shown(some_id)}") from None
            formula = self._broker.get_formula(info.formula_id)
        else:
            info = self._message(formula.message_id)
        return ok_reply(
            formula=formula.as_data(),
            message=None if info is None else message_data(info),
        )

    def dead(self, count: str = str(DEFAULT_DEAD)) -> Reply:
        if not _COUNT.fullmatch(count) or not 1 <= int(count) <= MAX_DEAD:
            raise CommandError(
                f"N must be a whole number from 1 to {MAX_DEAD}, not {_shown(count)}"
            )
        return ok_reply(dead=[asdict(info) for info in self._broker.dead_letters(int(count))])

    def redrive(self, target: str) -> Reply:
        """Redrive one dead letter, by message id (or its formula's id), or ``all``."""
        if target.lower() == "all":
            return ok_reply(redriven=self._broker.redrive_all())
        try:
            self._broker.redrive(target)
        except MessageNotFound:
            try:
                message_id = self._broker.get_formula(target).message_id
                self._broker.redrive(message_id)
            except (FormulaNotFound, MessageNotFound):
                raise CommandError(f"no dead letter has id {_shown(target)}") from None
        return ok_reply(redriven=1)

    def key(self, action: str, *args: str) -> Reply:
        """``key create NAME [SCOPE,...]``, ``key list`` or ``key revoke ID``."""
        verb = action.lower()
        if verb not in KEY_COMMANDS:
            raise CommandError(f"unknown key command {_shown(action)}; try help")
        usage, _, fewest, most = KEY_COMMANDS[verb]
        if not fewest <= len(args) <= most:
            raise CommandError(f"usage: {usage}")
        if verb == "create":
            return self._create_key(*args)
        if verb == "list":
            return ok_reply(keys=[key.as_data() for key in self._broker.list_keys()])
        self._broker.revoke_key(args[0])
        return ok_reply()

    def _create_key(self, name: str, scopes: str = ",".join(DEFAULT_SCOPES)) -> Reply:
        try:
            made = self._broker.create_key(name, scopes.split(","))
        except ValueError as exc:  # a name or a scope the broker refuses
            raise CommandError(str(exc)) from None
        key = made.key
        return ok_reply(id=key.id, name=key.name, scopes=list(key.scopes), secret=made.secret)

    def help(self) -> Reply:
        commands: dict[str, str] = {}
        for name, (usage, text, _, _) in COMMANDS.items():
            if name == "key":
                for verb, (key_usage, key_text, _, _) in KEY_COMMANDS.items():
                    commands[f"key {verb}"] = f"{key_usage}: {key_text}"
            else:
                commands[name] = f"{usage}: {text}"
        return ok_reply(commands=commands)

    def _message(self, message_id: str) -> MessageInfo | None:
        try:
            return self._broker.message_info(message_id)
        except MessageNotFound:
            return None  # acked: the message is gone for good


def message_data(info: MessageInfo) -> dict[str, Any]:
    """A message as plain data; ``visible_at`` (epoch seconds) as an RFC 3339 time."""
    data = asdict(info)
    if info.visible_at is not None:
        data["visible_at"] = rfc3339(info.visible_at)
    return data


def _describe(exc: FormularyError) -> str:
    if isinstance(exc, FormulaNotFound):
        return f"no formula has id {_shown(exc.formula_id)}"
    if isinstance(exc, MessageNotFound):
        return f"no message has id {_shown(exc.message_id)}"
    if isinstance(exc, ApiKeyNotFound):
        return f"no API key has id {_shown(exc.key_id)}"
    return f"{type(exc).__name__}: {exc}"


def _shown(text: str, limit: int = 60) -> str:
    """Quote what the client typed, shortened: error lines stay small."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
