"""The admin socket: its framing, its commands, its server, and the CLI over it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.admin import (
    COMMANDS,
    AdminCommands,
    AdminServer,
    AdminSocketBusy,
    LineSplitter,
    ProtocolError,
    TooLong,
    decode_line,
    encode_reply,
    parse_command,
)
from broker.apikeys import digest
from broker.engines.embedded import EmbeddedBroker
from broker.formula import FormulaDraft, parse_formula
from broker.interface import FormulaView
from tests.support import ROOT, wait_for

REPLY_TIMEOUT = 5.0


def draft(name: str, *materials: tuple[str, str]) -> FormulaDraft:
    parts = ", ".join(f'{{"name": "{m}", "concentration": {c}}}' for m, c in materials)
    return parse_formula(f'{{"name": "{name}", "materials": [{parts}]}}'.encode())


ROSE = draft("Rose accord", ("Rose", "10"), ("Musk", "2.5"))
CEDAR = draft("Cedar", ("Cedarwood", "20"))
IRIS = draft("Iris", ("Orris", "0.125"))


def kill(broker: EmbeddedBroker, formula: FormulaView) -> None:
    """Make ``formula``'s message a dead letter (the broker allows one delivery)."""
    (delivery,) = broker.receive("test")
    assert delivery.formula_id == formula.id
    broker.nack(delivery.receipt)


@pytest.fixture
def one_shot() -> EmbeddedBroker:
    """A broker that dead-letters a message on its first nack."""
    return EmbeddedBroker(max_deliveries=1)


@pytest.fixture
def commands(one_shot: EmbeddedBroker) -> AdminCommands:
    return AdminCommands(one_shot)


# -- framing -------------------------------------------------------------------


def test_a_line_parses_into_its_command_lowercased_and_its_arguments_as_typed() -> None:
    assert parse_command("  DEAD\t 10 ") == ("dead", ["10"])
    assert parse_command("show AbC-_1") == ("show", ["AbC-_1"])
    with pytest.raises(ProtocolError, match="empty command"):
        parse_command(" \t ")


def test_lines_end_at_newline_with_or_without_carriage_return_across_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"pi") == []
    assert splitter.feed(b"ng\r\nsta") == [b"ping"]
    assert splitter.feed(b"ts\n\nhelp\n") == [b"stats", b"", b"help"]


def test_a_line_at_the_limit_passes_and_one_byte_more_does_not() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"12345678\r\n") == [b"12345678"]
    assert splitter.feed(b"123456789\n") == [TooLong(8)]
    assert splitter.feed(b"x" * 100 + b"\nping\n") == [TooLong(8), b"ping"]


def test_a_long_line_is_reported_once_when_it_passes_the_limit_and_skipped_to_its_end() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"123456789") == []  # may still end in \r\n
    assert splitter.feed(b"0") == [TooLong(8)]
    assert splitter.feed(b"x" * 10_000) == []
    assert splitter.feed(b"yy\nping\n") == [b"ping"]


def test_an_unterminated_last_line_still_counts_at_end_of_stream() -> None:
    splitter = LineSplitter(8)
    splitter.feed(b"stats")
    assert splitter.finish() == b"stats"
    assert splitter.finish() is None
    splitter.feed(b"x" * 20)
    assert splitter.finish() is None


def test_a_line_that_is_not_utf8_is_a_protocol_error() -> None:
    assert decode_line("grüß".encode()) == "grüß"
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_line(b"show \xff\xfe")


def test_a_reply_is_one_line_of_compact_json_with_exact_decimals() -> None:
    line = encode_reply({"ok": True, "share": Decimal("15.50"), "name": "Iris pallida Ø"})
    assert line == '{"ok":true,"share":15.50,"name":"Iris pallida Ø"}\n'.encode()
    assert encode_reply({"ok": True, "odd": "\ud800"}) == b'{"ok":true,"odd":"\\ud800"}\n'


# -- commands --------------------------------------------------------------------


def test_ping_answers_pong(commands: AdminCommands) -> None:
    assert commands.dispatch("ping") == {"ok": True, "pong": True}


def test_commands_are_case_insensitive(commands: AdminCommands) -> None:
    assert commands.dispatch("PiNg") == {"ok": True, "pong": True}


def test_stats_answers_the_gauges_and_every_total(one_shot: EmbeddedBroker) -> None:
    one_shot.submit(ROSE)
    reply = AdminCommands(one_shot).dispatch("stats")
    assert reply == {"ok": True, **asdict(one_shot.stats())}
    gauges = {k: reply[k] for k in ("depth", "in_flight", "delayed", "dead", "formulas")}
    assert gauges == {"depth": 1, "in_flight": 0, "delayed": 0, "dead": 0, "formulas": 1}
    assert reply["submitted"] == 1 and reply["published"] == 1


def test_show_answers_the_formula_and_its_message_state(one_shot: EmbeddedBroker) -> None:
    formula = one_shot.submit(ROSE).formula
    reply = AdminCommands(one_shot).dispatch(f"show {formula.id}")
    assert reply["ok"] is True
    assert reply["formula"] == {
        "id": formula.id,
        "name": "Rose accord",
        "materials": [
            {"name": "Rose", "concentration": Decimal("10")},
            {"name": "Musk", "concentration": Decimal("2.5")},
        ],
        "fingerprint": formula.fingerprint,
        "status": "queued",
        "message_id": formula.message_id,
        "deliveries": 0,
        "created_at": formula.created_at,
        "processed_at": None,
        "summary": None,
    }
    message = asdict(one_shot.message_info(formula.message_id))
    assert reply["message"] == message and message["state"] == "ready"


def test_show_also_finds_a_formula_by_its_message_id(one_shot: EmbeddedBroker) -> None:
    formula = one_shot.submit(ROSE).formula
    commands = AdminCommands(one_shot)
    assert commands.dispatch(f"show {formula.message_id}") == commands.dispatch(
        f"show {formula.id}"
    )


def test_show_answers_null_message_state_once_the_message_is_acked(
    one_shot: EmbeddedBroker,
) -> None:
    formula = one_shot.submit(IRIS).formula
    (delivery,) = one_shot.receive("test")
    one_shot.complete(delivery.receipt, {"total": Decimal("0.125")})
    reply = AdminCommands(one_shot).dispatch(f"show {formula.id}")
    assert reply["message"] is None
    assert reply["formula"]["status"] == "processed"
    assert reply["formula"]["summary"] == {"total": Decimal("0.125")}
    assert b'"summary":{"total":0.125}' in encode_reply(reply)


def test_show_of_an_unknown_id_or_without_one_is_an_error(commands: AdminCommands) -> None:
    assert commands.dispatch("show nope") == {
        "ok": False,
        "error": "no formula or message has id 'nope'",
    }
    assert commands.dispatch("show") == {"ok": False, "error": "usage: show ID"}
    assert commands.dispatch("show a b") == {"ok": False, "error": "usage: show ID"}


def test_dead_lists_dead_letters_oldest_first_up_to_n(one_shot: EmbeddedBroker) -> None:
    formulas = [one_shot.submit(d).formula for d in (ROSE, CEDAR, IRIS)]
    for formula in formulas:
        kill(one_shot, formula)
    commands = AdminCommands(one_shot)
    reply = commands.dispatch("dead")
    assert reply == {"ok": True, "dead": [asdict(i) for i in one_shot.dead_letters()]}
    assert [d["formula_id"] for d in reply["dead"]] == [f.id for f in formulas]
    assert all(d["state"] == "dead" and d["deliveries"] == 1 for d in reply["dead"])
    assert [d["formula_id"] for d in commands.dispatch("dead 2")["dead"]] == [
        formulas[0].id,
        formulas[1].id,
    ]


def test_dead_with_no_dead_letters_answers_an_empty_list(commands: AdminCommands) -> None:
    assert commands.dispatch("dead") == {"ok": True, "dead": []}


@pytest.mark.parametrize("n", ["0", "-1", "x", "1.5", "+3", "٣", "99999999999"])
def test_dead_refuses_anything_but_a_positive_whole_number(commands: AdminCommands, n: str) -> None:
    reply = commands.dispatch(f"dead {n}")
    assert reply["ok"] is False and "N must be a whole number" in reply["error"]


def test_redrive_sends_one_dead_letter_back_by_message_or_formula_id(
    one_shot: EmbeddedBroker,
) -> None:
    rose, cedar = (one_shot.submit(d).formula for d in (ROSE, CEDAR))
    kill(one_shot, rose)
    kill(one_shot, cedar)
    commands = AdminCommands(one_shot)
    assert commands.dispatch(f"redrive {rose.message_id}") == {"ok": True, "redriven": 1}
    assert commands.dispatch(f"redrive {cedar.id}") == {"ok": True, "redriven": 1}
    assert one_shot.dead_letters() == []
    assert one_shot.message_info(rose.message_id).state == "ready"


def test_redrive_all_answers_how_many_went_back(one_shot: EmbeddedBroker) -> None:
    for d in (ROSE, CEDAR):
        kill(one_shot, one_shot.submit(d).formula)
    commands = AdminCommands(one_shot)
    assert commands.dispatch("REDRIVE ALL") == {"ok": True, "redriven": 2}
    assert commands.dispatch("redrive all") == {"ok": True, "redriven": 0}


def test_redrive_of_something_that_is_not_a_dead_letter_is_an_error(
    one_shot: EmbeddedBroker,
) -> None:
    live = one_shot.submit(ROSE).formula
    commands = AdminCommands(one_shot)
    for target in ("nope", live.id, live.message_id):
        reply = commands.dispatch(f"redrive {target}")
        assert reply == {"ok": False, "error": f"no dead letter has id {target!r}"}
    assert commands.dispatch("redrive")["error"] == "usage: redrive ID|all"


def test_help_describes_every_command(commands: AdminCommands) -> None:
    reply = commands.dispatch("help")
    assert reply["ok"] is True
    assert set(COMMANDS) == {"ping", "stats", "show", "dead", "redrive", "key", "help"}
    # key's own commands are described one by one.
    assert list(reply["commands"]) == [
        "ping",
        "stats",
        "show",
        "dead",
        "redrive",
        "key create",
        "key list",
        "key revoke",
        "help",
    ]
    assert all(isinstance(text, str) and text for text in reply["commands"].values())
    assert reply["commands"]["key create"].startswith("key create NAME [SCOPE,...]: ")


def test_an_unknown_command_or_extra_argument_is_an_error(commands: AdminCommands) -> None:
    assert commands.dispatch("shutdown now") == {
        "ok": False,
        "error": "unknown command 'shutdown'; try help",
    }
    assert commands.dispatch("ping twice") == {"ok": False, "error": "usage: ping"}
    assert commands.dispatch("") == {"ok": False, "error": "empty command"}


def test_key_create_answers_the_key_with_its_secret_and_list_shows_it_without(
    one_shot: EmbeddedBroker,
) -> None:
    commands = AdminCommands(one_shot)
    made = commands.dispatch("key create ci")
    assert made["ok"] is True and set(made) == {"ok", "id", "name", "scopes", "secret"}
    assert (made["name"], made["scopes"]) == ("ci", ["submit", "read"])
    key = one_shot.authenticate(made["id"], digest(made["secret"]))
    assert key is not None and key.id == made["id"]
    scraper = commands.dispatch("KEY CREATE scraper METRICS,read")
    assert scraper["scopes"] == ["read", "metrics"]

    listed = commands.dispatch("key list")

    assert listed == {"ok": True, "keys": [k.as_data() for k in one_shot.list_keys()]}
    assert [k["id"] for k in listed["keys"]] == [made["id"], scraper["id"]]
    assert set(listed["keys"][0]) == {"id", "name", "scopes", "created_at", "revoked_at"}
    assert made["secret"] not in json.dumps(listed)


def test_key_revoke_answers_ok_and_the_key_no_longer_lets_anyone_in(
    one_shot: EmbeddedBroker,
) -> None:
    commands = AdminCommands(one_shot)
    made = commands.dispatch("key create ci submit")

    assert commands.dispatch(f"key revoke {made['id']}") == {"ok": True}

    assert one_shot.authenticate(made["id"], digest(made["secret"])) is None
    [key] = commands.dispatch("key list")["keys"]
    assert key["revoked_at"] is not None
    assert commands.dispatch(f"key revoke {made['id']}") == {"ok": True}  # again: harmless


def test_key_commands_typed_wrong_are_errors_that_make_nothing(commands: AdminCommands) -> None:
    errors = {
        "key create ci admin": "unknown scope 'admin': scopes are submit, read, metrics",
        "key create ci read,admin": "unknown scope 'admin': scopes are submit, read, metrics",
        "key create ci ,": "a key needs at least one scope of submit, read, metrics",
        f"key create {'n' * 101}": "a key's name is at most 100 characters",
        "key create": "usage: key create NAME [SCOPE,...]",
        "key revoke": "usage: key revoke ID",
        "key revoke nope": "no API key has id 'nope'",
        "key list all": "usage: key list",
        "key rotate ci": "unknown key command 'rotate'; try help",
        "key": "usage: key create|list|revoke ...",
    }
    for line, error in errors.items():
        assert commands.dispatch(line) == {"ok": False, "error": error}, line
    assert commands.dispatch("key list") == {"ok": True, "keys": []}


class BrokenBroker(EmbeddedBroker):
    def stats(self) -> Any:
        raise RuntimeError("disk on fire")


def test_an_unexpected_failure_is_an_error_reply_not_an_exception() -> None:
    reply = AdminCommands(BrokenBroker()).dispatch("stats")
    assert reply == {"ok": False, "error": "internal error: RuntimeError"}


# -- server ----------------------------------------------------------------------


@pytest.fixture
def directory() -> Iterator[Path]:
    # Short, since Unix socket paths must stay under ~100 bytes.
    path = Path(tempfile.mkdtemp(prefix="fm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_path(directory: Path) -> Path:
    return directory / "run" / "admin.sock"


@pytest.fixture
def server(one_shot: EmbeddedBroker, socket_path: Path) -> Iterator[AdminServer]:
    with AdminServer(socket_path, AdminCommands(one_shot)) as running:
        yield running


class Client:
    """One admin connection; every read waits at most REPLY_TIMEOUT seconds."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(str(path))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Any:
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; got {self.pending!r}"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line, parse_float=Decimal)

    def ask(self, line: str) -> Any:
        self.send(line.encode() + b"\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Any]:
    clients: list[Client] = []

    def open_client(path: Path) -> Client:
        clients.append(Client(path))
        return clients[-1]

    yield open_client
    for client in clients:
        client.close()


def test_every_command_answers_in_turn_on_one_connection(
    server: AdminServer, one_shot: EmbeddedBroker, connect: Any
) -> None:
    rose, cedar = (one_shot.submit(d).formula for d in (ROSE, CEDAR))
    kill(one_shot, rose)
    client = connect(server.path)
    # Several lines in one write: each gets its own reply, in order.
    client.send(b"ping\r\nstats\n")
    assert client.reply() == {"ok": True, "pong": True}
    assert client.reply()["dead"] == 1
    assert client.ask(f"show {cedar.id}")["formula"]["materials"] == [
        {"name": "Cedarwood", "concentration": Decimal("20")}
    ]
    assert [d["formula_id"] for d in client.ask("dead 5")["dead"]] == [rose.id]
    assert client.ask(f"redrive {rose.message_id}") == {"ok": True, "redriven": 1}
    assert client.ask("help") == AdminCommands(one_shot).dispatch("help")


def test_errors_are_answered_and_the_connection_stays_open(
    server: AdminServer, connect: Any
) -> None:
    client = connect(server.path)
    assert client.ask("frobnicate")["ok"] is False
    assert client.ask("dead many")["ok"] is False
    client.send(b"show \xff\n")
    assert client.reply() == {"ok": False, "error": "the line is not valid UTF-8"}
    client.send(b"x" * 10_000 + b"\n")
    assert client.reply() == {"ok": False, "error": "line too long"}
    client.send(b"\n   \n")  # blank lines get no reply
    assert client.ask("ping") == {"ok": True, "pong": True}


def test_no_secret_reaches_the_log_whatever_is_asked(
    server: AdminServer, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = connect(server.path)
    made = client.ask("key create ci submit,read")
    other = client.ask("key create scraper metrics")
    client.ask("key list")
    client.ask(f"key revoke {made['id']}")
    client.ask("key create ci admin")
    client.send(b"key create " + b"x" * 10_000 + b"\n")
    assert client.reply()["error"] == "line too long"
    client.close()
    wait_for(lambda: server.path.exists(), what="the server")

    secrets = (made["secret"], other["secret"])
    assert all(secret.startswith("fmk.") for secret in secrets)
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert made["id"] in logged  # the engine says which key it made, by id
    assert not any(secret in logged for secret in secrets)
    assert not any(secret.split(".")[-1] in logged for secret in secrets)


def test_the_socket_is_owner_only_in_an_owner_only_directory(
    server: AdminServer, socket_path: Path
) -> None:
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700


def test_silent_and_garbage_clients_do_not_stop_another_client(
    server: AdminServer, connect: Any
) -> None:
    silent = connect(server.path)
    garbage = connect(server.path)
    garbage.send(os.urandom(3000).replace(b"\n", b"?"))
    other = connect(server.path)
    assert other.ask("ping") == {"ok": True, "pong": True}
    garbage.send(os.urandom(1_000_000).replace(b"\n", b"?") + b"\n")
    assert garbage.reply() == {"ok": False, "error": "line too long"}
    assert other.ask("stats")["ok"] is True
    assert garbage.ask("ping") == {"ok": True, "pong": True}
    assert connect(server.path).ask("ping") == {"ok": True, "pong": True}
    silent.close()


def test_a_client_beyond_the_connection_cap_is_told_and_closed(
    one_shot: EmbeddedBroker, socket_path: Path, connect: Any
) -> None:
    with AdminServer(socket_path, AdminCommands(one_shot), max_connections=2) as server:
        first = connect(server.path)
        assert first.ask("ping")["ok"] is True
        connect(server.path)
        extra = connect(server.path)
        assert extra.reply() == {"ok": False, "error": "too many admin connections"}
        assert extra.closed_by_server()
        first.close()
        wait_for(
            lambda: connect(server.path).ask("ping")["ok"],
            timeout=REPLY_TIMEOUT,
            what="a connection slot to free up",
        )


def test_an_idle_client_is_told_and_hung_up_on(
    one_shot: EmbeddedBroker, socket_path: Path, connect: Any
) -> None:
    with AdminServer(socket_path, AdminCommands(one_shot), idle_timeout=0.2) as server:
        client = connect(server.path)
        assert client.reply() == {"ok": False, "error": "idle timeout"}
        assert client.closed_by_server()


def test_a_stale_socket_file_is_replaced(
    one_shot: EmbeddedBroker, socket_path: Path, connect: Any
) -> None:
    socket_path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(socket_path))  # closed without unlinking, as by a crash
    with AdminServer(socket_path, AdminCommands(one_shot)) as server:
        assert connect(server.path).ask("ping")["ok"] is True


def test_a_live_server_on_the_path_is_not_replaced(
    server: AdminServer, one_shot: EmbeddedBroker, connect: Any
) -> None:
    with pytest.raises(AdminSocketBusy, match="already listening"):
        AdminServer(server.path, AdminCommands(one_shot)).start()
    assert connect(server.path).ask("ping")["ok"] is True


def test_a_file_that_is_not_a_socket_is_left_alone(
    one_shot: EmbeddedBroker, socket_path: Path
) -> None:
    socket_path.parent.mkdir(mode=0o700)
    socket_path.write_text("precious")
    with pytest.raises(AdminSocketBusy, match="not a socket"):
        AdminServer(socket_path, AdminCommands(one_shot)).start()
    assert socket_path.read_text() == "precious"


def test_close_hangs_up_on_clients_and_removes_the_socket_file(
    one_shot: EmbeddedBroker, socket_path: Path, connect: Any
) -> None:
    server = AdminServer(socket_path, AdminCommands(one_shot))
    server.start()
    client = connect(socket_path)
    assert client.ask("ping")["ok"] is True
    server.close()
    assert client.closed_by_server()
    assert not socket_path.exists()
    server.close()  # twice is harmless


# -- the command-line client -------------------------------------------------------


def admin_cli(*args: str, socket_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORMULARY_")}
    env["PYTHONPATH"] = str(ROOT)
    if socket_path is not None:
        env["FORMULARY_ADMIN_SOCKET"] = str(socket_path)
    return subprocess.run(
        [sys.executable, "-m", "broker.admin", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_cli_prints_stats_as_aligned_rows(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    one_shot.submit(ROSE)
    done = admin_cli("stats", socket_path=server.path)
    assert done.returncode == 0, done.stderr
    rows = dict(line.split() for line in done.stdout.splitlines())
    assert rows["depth"] == "1" and rows["formulas"] == "1" and rows["dead_lettered"] == "0"
    assert len({line.rindex(" ") for line in done.stdout.splitlines()}) == 1


def test_the_cli_prints_the_raw_reply_with_json(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    done = admin_cli("stats", "--json", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True, **asdict(one_shot.stats())}


def test_the_cli_prints_dead_letters_as_a_table(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    rose = one_shot.submit(ROSE).formula
    kill(one_shot, rose)
    done = admin_cli("dead", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["message_id", "formula_id", "deliveries"]
    assert row.split() == [rose.message_id, rose.id, "1"]


def test_the_cli_prints_a_formula_as_key_value_lines(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    rose = one_shot.submit(ROSE).formula
    done = admin_cli("show", rose.id, "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["id:", rose.id]
    assert "materials:" in lines and "summary: -" in lines and "message:" in lines
    assert ["Musk", "2.5"] in [line.split() for line in lines]
    assert ["state:", "ready"] in [line.split() for line in lines]


def test_the_cli_prints_a_new_keys_secret_on_its_own_line_after_a_warning(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    done = admin_cli("key", "create", "ci", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    [key] = one_shot.list_keys()
    assert lines[0].split() == ["id:", key.id] and lines[1].split() == ["name:", "ci"]
    assert lines[2] == "scopes: submit,read"
    assert "shown this once" in lines[-2]
    assert one_shot.authenticate(key.id, digest(lines[-1])) == key


def test_the_cli_prints_keys_as_a_table_and_says_what_it_revoked(
    server: AdminServer, one_shot: EmbeddedBroker
) -> None:
    assert admin_cli("key", "list", "--socket", str(server.path)).stdout == "no API keys\n"
    ci = one_shot.create_key("ci", ["submit", "read"]).key
    scraper = one_shot.create_key("scraper", ["metrics"]).key
    one_shot.revoke_key(ci.id)

    done = admin_cli("key", "list", "--socket", str(server.path))

    assert done.returncode == 0, done.stderr
    header, first, second = done.stdout.splitlines()
    assert header.split() == ["id", "name", "scopes", "created_at", "revoked_at"]
    [revoked] = [k for k in one_shot.list_keys() if k.id == ci.id]
    assert first.split() == [ci.id, "ci", "submit,read", ci.created_at, str(revoked.revoked_at)]
    assert second.split() == [scraper.id, "scraper", "metrics", scraper.created_at, "-"]
    assert header.index("created_at") == first.index(ci.created_at)
    assert first.index(ci.created_at) == second.index(scraper.created_at)
    done = admin_cli("key", "revoke", scraper.id, "--socket", str(server.path))
    assert (done.returncode, done.stdout) == (0, f"revoked API key {scraper.id}\n")
    done = admin_cli("--json", "key", "revoke", "nope", "--socket", str(server.path))
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"ok": False, "error": "no API key has id 'nope'"}


def test_the_cli_exits_1_when_the_broker_answers_an_error(server: AdminServer) -> None:
    done = admin_cli("frobnicate", "--socket", str(server.path))
    assert done.returncode == 1
    assert "error: unknown command 'frobnicate'" in done.stderr


def test_the_cli_takes_an_id_that_starts_with_a_dash_as_the_id(server: AdminServer) -> None:
    # Ids are base64url: one in 64 starts with "-", and argparse alone calls that an option.
    done = admin_cli("--json", "show", "-5XIEuOn5B_fVrOzgNBVcg", "--socket", str(server.path))
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout) == {
        "ok": False,
        "error": "no formula or message has id '-5XIEuOn5B_fVrOzgNBVcg'",
    }


def test_the_cli_exits_2_when_nothing_listens_on_the_socket(directory: Path) -> None:
    missing = directory / "admin.sock"
    done = admin_cli("ping", "--socket", str(missing))
    assert done.returncode == 2
    assert f"cannot reach the admin socket at {missing}: is the broker running?" in done.stderr


def test_show_gives_a_leased_message_its_deadline_as_a_wall_clock_time() -> None:
    # Monotonic 100 s is wall-clock 2026-11-18T11:06:40Z; the lease is 30 s.
    broker = EmbeddedBroker(clock=lambda: 100.0, wall_clock=lambda: 1_795_000_000.0)
    formula = broker.submit(
        parse_formula(b'{"name": "x", "materials": [{"name": "Oud", "concentration": 1}]}')
    ).formula
    broker.receive("w", 1, 30)
    reply = AdminCommands(broker).dispatch(f"show {formula.id}")
    assert reply["message"]["state"] == "in_flight"
    assert reply["message"]["visible_at"] == "2026-11-18T11:07:10.000Z"
