"""``python -m broker.migrate``: a deployment copied between engines, checked through the broker.

Sources are built by the real engines through the broker interface, copied by
the real command, and the targets are opened as a broker would open them:
every check is something a client or an operator could see.
"""

from __future__ import annotations

import io
import itertools
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from broker.apikeys import digest
from broker.engines import Engine, open_engine
from broker.engines.embedded.changes import StoreFormula
from broker.engines.embedded.journal import SqliteJournal
from broker.engines.embedded.store import FormulaRecord, pack_materials
from broker.engines.portable import Records, open_source, open_target
from broker.errors import DuplicateFormula, IdempotencyKeyReused, QueueFull
from broker.formula import FormulaDraft, Material, fingerprint
from broker.interface import (
    FAILED,
    MAX_PAGE,
    PROCESSED,
    QUEUED,
    ApiKey,
    BrokerStats,
    FormulaView,
    IdempotencyKey,
    MessageInfo,
    Submission,
)
from broker.migrate import EXIT_DONE, EXIT_REFUSED, EXIT_UNUSABLE, Progress, main
from broker.settings import Settings
from tests.support import ROOT

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

T = TypeVar("T")

EMBEDDED = "embedded"
POSTGRES = "postgres"

Place = Callable[[str], str]
"""A new, empty FORMULARY_DATA of the kind named (``EMBEDDED`` or ``POSTGRES``)."""


@pytest.fixture
def place(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Place]:
    made: list[str] = []
    server: list[PostgresServer] = []
    numbers = itertools.count(1)

    def new(kind: str) -> str:
        if kind == EMBEDDED:
            return str(tmp_path / f"journal-{next(numbers)}.sqlite3")
        if not server:
            server.append(request.getfixturevalue("postgres_server"))
        made.append(server[0].create_database())
        return made[-1]

    yield new
    for dsn in made:
        server[0].drop_database(dsn)


def draft(name: str, *concentrations: str) -> FormulaDraft:
    materials = tuple(
        Material(f"{name} material {i}", Decimal(c)) for i, c in enumerate(concentrations)
    )
    return FormulaDraft(name, materials, fingerprint(materials))


DRAFTS = {
    "doomed": draft("Doomed", "12.5"),
    "doomed2": draft("Doomed too", "12.5"),
    "a": draft("Amber", "15.5", "10", "5.2"),
    "b": draft("Bergamot", "0.000001"),
    "c": draft("Cedar", "33.333333", "66.666667"),
    "e": draft("Elemi", "1"),
    "f": draft("Fir", "2.5"),
    "d": draft("Dune", "7.25", "7.75"),
}


def key(name: str) -> IdempotencyKey:
    return IdempotencyKey(f"key-{name}", f"digest-{name}")


def summary_of(view: FormulaView) -> dict[str, object]:
    total = sum((m.concentration for m in view.materials), Decimal(0))
    return {"material_count": len(view.materials), "carrier_remainder": Decimal(100) - total}


@dataclass
class Deployment:
    """What a deployment looked like just before it was copied."""

    listed: tuple[FormulaView, ...]
    accepted: dict[str, Submission]
    dead: list[MessageInfo]
    stats: BrokerStats
    api_keys: list[ApiKey]
    secrets: dict[str, str]
    """Each API key's secret, by its name."""


def build(data: str) -> Deployment:
    """A deployment in every state: processed, failed, leased, delayed, fresh; keys alive or
    not, of no API key and of one; API keys live and revoked."""
    # A broker that dead-letters on the first nack and forgets keys at once.
    engine = open_engine(Settings(data=data, max_deliveries=1, idempotency_ttl=0.001))
    try:
        accepted = {
            "doomed": engine.submit(DRAFTS["doomed"], key("expired")),
            "doomed2": engine.submit(DRAFTS["doomed2"]),
        }
        first, second = engine.receive("worker", 2)
        engine.nack(second.receipt)  # dead letters in another order than the formulas'
        engine.nack(first.receipt)
    finally:
        engine.close()
    engine = open_engine(Settings(data=data, max_deliveries=5))
    try:
        for name in ("a", "b", "c", "e", "f", "d"):
            keyed = key(name) if name in ("a", "c") else None
            accepted[name] = engine.submit(DRAFTS[name], keyed)
        [refused] = engine.submit_many([(DRAFTS["d"], key("dup"))])
        assert isinstance(refused, DuplicateFormula)
        client = engine.create_key("client", ["submit", "read"])
        former = engine.create_key("former", ["metrics"])
        engine.revoke_key(former.key.id)
        # The client's own key-a: another key than the one of no API key, above.
        owned = IdempotencyKey("key-a", "digest-client", owner=client.key.id)
        [owned_refusal] = engine.submit_many([(DRAFTS["a"], owned)])
        assert isinstance(owned_refusal, DuplicateFormula) and not owned_refusal.replayed
        a, b, c, e, f = engine.receive("worker", 5)
        engine.ack(f.receipt)  # acked without a result: no message, still queued
        for done in (a, c):
            engine.complete(done.receipt, summary_of(engine.get_formula(done.formula_id)))
        engine.nack(b.receipt)
        engine.nack(e.receipt, delay=300)
        [again] = engine.receive("worker", 1, visibility_timeout=300)
        assert (again.formula_id, again.delivery) == (accepted["b"].formula.id, 2)
        deployment = Deployment(
            engine.list_formulas(MAX_PAGE).items,
            accepted,
            engine.dead_letters(),
            engine.stats(),
            engine.list_keys(),
            {"client": client.secret, "former": former.secret},
        )
    finally:
        engine.close()
    assert [f.status for f in deployment.listed] == [
        QUEUED,  # d: fresh
        QUEUED,  # f: acked, no result
        QUEUED,  # e: delayed
        PROCESSED,  # c
        QUEUED,  # b: leased, its second delivery
        PROCESSED,  # a
        FAILED,  # doomed2: dead first
        FAILED,  # doomed: dead after doomed2
    ]
    assert [d.formula_id for d in deployment.dead] == [
        accepted["doomed2"].formula.id,
        accepted["doomed"].formula.id,
    ]
    assert (deployment.stats.depth, deployment.stats.in_flight) == (1, 1)
    assert (deployment.stats.delayed, deployment.stats.dead) == (1, 2)
    assert [k.name for k in deployment.api_keys] == ["client", "former"]
    assert deployment.api_keys[1].revoked_at is not None
    return deployment


def open_broker(data: str, queue_capacity: int = 100_000) -> Engine:
    return open_engine(Settings(data=data, max_deliveries=5, queue_capacity=queue_capacity))


# -- a whole deployment ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_kind", "target_kind"),
    [(EMBEDDED, POSTGRES), (POSTGRES, EMBEDDED), (EMBEDDED, EMBEDDED), (POSTGRES, POSTGRES)],
)
def test_a_deployment_copied_to_another_engine_answers_as_the_original_did(
    place: Place, source_kind: str, target_kind: str
) -> None:
    source, target = place(source_kind), place(target_kind)
    before = build(source)
    out = io.StringIO()

    assert main([source, target], stderr=out) == EXIT_DONE, out.getvalue()

    engine = open_broker(target, queue_capacity=4)
    try:
        # Every formula as it was, in the same order, pages and cursors included.
        assert engine.list_formulas(MAX_PAGE).items == before.listed
        paged: list[FormulaView] = []
        cursor: str | None = None
        for _ in range(3):
            page = engine.list_formulas(3, cursor)
            paged.extend(page.items)
            cursor = page.next_cursor
        assert tuple(paged) == before.listed and cursor is None
        assert [engine.get_formula(f.id) for f in before.listed] == list(before.listed)

        # What is leased or delayed at the source is ready now; the dead letter stays dead.
        stats = engine.stats()
        gauges = (stats.formulas, stats.depth, stats.in_flight, stats.delayed, stats.dead)
        assert gauges == (8, 3, 0, 0, 2)
        assert engine.dead_letters() == before.dead

        # Idempotency keys alive at the source answer as they did; the expired one is gone.
        replay = engine.submit(DRAFTS["a"], key("a"))
        assert replay == replace(before.accepted["a"], replayed=True)
        [dup, reused, expired] = engine.submit_many(
            [
                (DRAFTS["d"], key("dup")),
                (DRAFTS["a"], IdempotencyKey("key-c", "digest-a")),
                (DRAFTS["doomed"], key("expired")),
            ]
        )
        d_id = before.accepted["d"].formula.id
        assert isinstance(dup, DuplicateFormula)
        assert dup.args == (d_id, DRAFTS["d"].fingerprint, True)
        assert isinstance(reused, IdempotencyKeyReused)
        doomed_id = before.accepted["doomed"].formula.id
        assert isinstance(expired, DuplicateFormula)
        assert expired.args == (doomed_id, DRAFTS["doomed"].fingerprint, False)

        # API keys as they were, revoked or not; their secrets work as before.
        assert engine.list_keys() == before.api_keys
        client, former = before.api_keys
        assert engine.authenticate(client.id, digest(before.secrets["client"])) == client
        assert engine.authenticate(former.id, digest(before.secrets["former"])) is None
        # An idempotency key stays its API key's.
        a_id = before.accepted["a"].formula.id
        [owned, owned_reused] = engine.submit_many(
            [
                (DRAFTS["a"], IdempotencyKey("key-a", "digest-client", owner=client.id)),
                (DRAFTS["a"], IdempotencyKey("key-a", "digest-a", owner=client.id)),
            ]
        )
        assert isinstance(owned, DuplicateFormula)
        assert owned.args == (a_id, DRAFTS["a"].fingerprint, True)
        assert isinstance(owned_reused, IdempotencyKeyReused)

        # Live messages: redeliveries first, each count going on; then the fresh one.
        deliveries = engine.receive("worker", 10)
        counts = {d.formula_id: d.delivery for d in deliveries}
        ids = {name: s.formula.id for name, s in before.accepted.items()}
        assert counts == {ids["b"]: 3, ids["e"]: 2, ids["d"]: 1}
        assert deliveries[-1].formula_id == ids["d"]
        assert engine.get_formula(ids["b"]).deliveries == 3

        # A dead letter can be redriven, and starts a fresh count.
        dead = before.dead[0]
        assert engine.get_formula(dead.formula_id).status == FAILED
        engine.redrive(dead.message_id)
        [redriven] = engine.receive("worker", 1)
        assert (redriven.message_id, redriven.delivery) == (dead.message_id, 1)

        # The queue holds exactly what was copied: 4 live now, at capacity.
        [full] = engine.submit_many([(draft("Fig", "3"), None)])
        assert isinstance(full, QueueFull)
        assert engine.stats().formulas == 8
    finally:
        engine.close()


# -- refusals ----------------------------------------------------------------------


def small_source(place: Place, kind: str = EMBEDDED, count: int = 3) -> tuple[str, list[str]]:
    """A deployment of ``count`` queued formulas (the first with a key); their ids."""
    data = place(kind)
    engine = open_broker(data)
    try:
        ids = [
            engine.submit(draft(f"Small {i}", "1"), key("small") if i == 0 else None).formula.id
            for i in range(count)
        ]
    finally:
        engine.close()
    return data, ids


def listed(data: str) -> tuple[FormulaView, ...]:
    engine = open_broker(data)
    try:
        return engine.list_formulas(MAX_PAGE).items
    finally:
        engine.close()


@pytest.mark.parametrize("target_kind", [EMBEDDED, POSTGRES])
def test_a_target_that_holds_anything_is_refused_and_left_as_it_was(
    place: Place, target_kind: str
) -> None:
    source, _ = small_source(place)
    target, _ = small_source(place, target_kind, count=1)
    before = listed(target)
    out = io.StringIO()

    assert main([source, target], stderr=out) == EXIT_REFUSED

    assert "is not empty: it holds 1 formula, 1 idempotency key, 1 message" in out.getvalue()
    assert listed(target) == before


@pytest.mark.parametrize("target_kind", [EMBEDDED, POSTGRES])
def test_a_target_that_holds_only_an_api_key_is_refused(place: Place, target_kind: str) -> None:
    source, _ = small_source(place)
    target = place(target_kind)
    engine = open_broker(target)
    try:
        made = engine.create_key("local", ["submit", "read"])
    finally:
        engine.close()
    out = io.StringIO()

    assert main([source, target], stderr=out) == EXIT_REFUSED

    assert "is not empty: it holds 1 API key" in out.getvalue()
    engine = open_broker(target)
    try:
        assert engine.list_keys() == [made.key] and engine.stats().formulas == 0
    finally:
        engine.close()


def test_memory_is_refused_on_either_side(place: Place, tmp_path: Path) -> None:
    source, _ = small_source(place)
    target = tmp_path / "never-made.sqlite3"
    out = io.StringIO()

    assert main([":memory:", str(target)], stderr=out) == EXIT_REFUSED
    assert main([source, ":memory:"], stderr=out) == EXIT_REFUSED
    assert main([source, source], stderr=out) == EXIT_REFUSED

    assert not target.exists()
    text = out.getvalue()
    assert "the source cannot be :memory:" in text and "the target cannot be :memory:" in text
    assert "the source and the target are the same" in text


def test_a_source_that_cannot_be_read_is_exit_3(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 99")
    out = io.StringIO()

    missing = str(tmp_path / "missing.sqlite3")
    assert main([missing, str(tmp_path / "t1")], stderr=out) == EXIT_UNUSABLE
    assert main([str(newer), str(tmp_path / "t2")], stderr=out) == EXIT_UNUSABLE

    assert "does not exist" in out.getvalue() and "newer Formulary" in out.getvalue()
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


def test_bad_arguments_are_refused_and_help_says_to_stop_the_brokers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    assert main(["only-one"], stderr=out) == EXIT_REFUSED
    assert "usage:" in out.getvalue()
    assert main(["--help"]) == EXIT_DONE
    assert "Stop every broker" in capsys.readouterr().out


# -- failures leave the target empty ---------------------------------------------------


def test_a_record_the_target_refuses_rolls_the_whole_copy_back_and_a_rerun_succeeds(
    place: Place, tmp_path: Path
) -> None:
    # Two formulas of one make-up: the journal holds them (it never checks), a
    # database's unique fingerprint does not take the second.
    broken = tmp_path / "broken.sqlite3"
    journal = SqliteJournal(broken)
    twice = draft("Twice", "2")
    records = [
        FormulaRecord.new(
            f"formula-{i}-xxxxxxxxxxxx",
            twice.name,
            pack_materials(twice.materials),
            twice.fingerprint,
            f"message-{i}-xxxxxxxxxxxx",
            time.time(),
        )
        for i in range(2)
    ]
    journal.write([StoreFormula(r) for r in records])
    journal.close()
    target = place(POSTGRES)
    out = io.StringIO()

    assert main([str(broken), target], stderr=out) == EXIT_UNUSABLE
    assert "failed and was rolled back" in out.getvalue()
    assert open_target(target).holdings().empty

    good, ids = small_source(place)
    assert main([good, target], stderr=io.StringIO()) == EXIT_DONE
    assert [f.id for f in listed(target)] == ids[::-1]


def failing_after(batches: Iterable[Sequence[T]], count: int) -> Iterator[Sequence[T]]:
    """``batches``, then an error in place of batch ``count`` + 1 (a source lost mid-read)."""
    for n, batch in enumerate(batches):
        if n == count:
            raise OSError("the source's disk went away")
        yield batch


@pytest.mark.parametrize("target_kind", [EMBEDDED, POSTGRES])
def test_an_import_that_fails_partway_leaves_the_target_empty_for_a_rerun(
    place: Place, target_kind: str
) -> None:
    source_data, ids = small_source(place, count=5)
    target_data = place(target_kind)
    source, target = open_source(source_data), open_target(target_data)
    try:
        with pytest.raises(OSError, match="disk went away"):
            target.import_all(
                Records(
                    formulas=failing_after(source.formulas(1), 3),
                    keys=source.keys(1),
                    messages=source.messages(1),
                    api_keys=source.api_keys(1),
                )
            )
        assert target.holdings().empty
    finally:
        target.close()
        source.close()

    assert main([source_data, target_data], stderr=io.StringIO()) == EXIT_DONE
    assert [f.id for f in listed(target_data)] == ids[::-1]


# -- what people see ---------------------------------------------------------------


def test_progress_off_a_terminal_is_one_line_per_phase(place: Place) -> None:
    source, _ = small_source(place)
    target = place(EMBEDDED)
    out = io.StringIO()

    assert main([source, target], stderr=out) == EXIT_DONE

    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == (f"copying {source} -> {target}: 3 formulas, 1 idempotency key, 3 messages")
    phases = sorted(lines[1:5])
    for line, (what, count) in zip(
        phases,
        [("API keys", 0), ("formulas", 3), ("idempotency keys", 1), ("messages", 3)],
        strict=True,
    ):
        assert re.fullmatch(rf"{what}: {count} of {count} in \d+\.\ds \([\d,-]+/s\)", line), line
    assert re.fullmatch(r"done in \d+\.\ds: copied 3 formulas, .*", lines[5])
    assert len(lines) == 6


def test_progress_on_a_terminal_is_rewritten_in_place() -> None:
    out = io.StringIO()
    ticks = itertools.count()
    progress = Progress(out, live=True, clock=lambda: float(next(ticks)), interval=1.0)

    batches = list(progress.track("formulas", 4_000, [[0] * 1_000] * 4))

    assert len(batches) == 4
    text = out.getvalue()
    assert text.startswith("\rformulas: 0 of 4,000")
    assert "\rformulas: 1,000 of 4,000 (25%), 1,000/s" in text
    assert text.endswith("\rformulas: 4,000 of 4,000 in 5.0s (800/s)\n")


def test_the_command_runs_as_a_module_with_its_exit_codes(place: Place) -> None:
    source, _ = small_source(place)
    target = place(EMBEDDED)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker.migrate", source, target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first = run()
    assert first.returncode == EXIT_DONE, first.stderr
    assert "copied 3 formulas" in first.stderr and first.stdout == ""
    again = run()
    assert again.returncode == EXIT_REFUSED
    assert f"the target {target} is not empty" in again.stderr
