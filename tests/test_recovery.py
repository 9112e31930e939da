"""The broker with its SQLite journal: what a restart brings back, and what a
failure in the middle of a change leaves behind."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.engines.embedded import EmbeddedBroker
from broker.engines.embedded.changes import Change, StoreFormula
from broker.engines.embedded.journal import SqliteJournal
from broker.engines.embedded.queue import MessageQueue
from broker.errors import DuplicateFormula, StorageFailed
from broker.formula import FormulaDraft, parse_formula
from broker.interface import IdempotencyKey, Submission
from tests.conftest import FakeClock


def draft(tag: str, concentration: str = "1") -> FormulaDraft:
    material = f'{{"name": "{tag}", "concentration": {concentration}}}'
    return parse_formula(f'{{"name": "{tag}", "materials": [{material}]}}'.encode())


class Opener:
    """Opens the same journal file again and again, as restarts would."""

    def __init__(self, path: Path, clock: FakeClock, wall_clock: FakeClock) -> None:
        self.path = path
        self.clock = clock
        self.wall_clock = wall_clock
        self.ids = (f"id-{n:06d}-padding-xyz" for n in itertools.count(1))
        self.open: list[EmbeddedBroker] = []

    def __call__(self, **kwargs: Any) -> EmbeddedBroker:
        if "journal" not in kwargs:
            kwargs["journal"] = SqliteJournal(self.path)
        broker = EmbeddedBroker(
            max_deliveries=3,
            clock=self.clock,
            wall_clock=self.wall_clock,
            new_id=lambda: next(self.ids),
            **kwargs,
        )
        self.open.append(broker)
        return broker


@pytest.fixture
def restart(tmp_path: Path, clock: FakeClock, wall_clock: FakeClock) -> Any:
    opener = Opener(tmp_path / "journal.sqlite3", clock, wall_clock)
    yield opener
    for broker in opener.open:
        broker.close()


def test_a_restart_brings_back_store_index_keys_and_queue_order(restart, clock) -> None:
    first = restart()
    c = first.submit(draft("C")).formula
    a = first.submit(draft("A", "15.5"), IdempotencyKey("key-a", "digest-a")).formula
    b = first.submit(draft("B")).formula
    d = first.submit(draft("D")).formula
    for _ in range(3):  # C uses up its deliveries: dead
        [delivery] = first.receive("w", 1)
        assert delivery.formula_id == c.id
        first.nack(delivery.receipt)
    assert first.get_formula(c.id).status == "failed"
    [lease_a, lease_b] = first.receive("w", 2)  # A's lease will run out
    assert lease_a.formula_id == a.id
    assert first.complete(lease_b.receipt, {"total": Decimal("1.000001")})  # B processed
    clock.advance(31)
    before = {f.id: first.get_formula(f.id) for f in (a, b, c, d)}
    first.close()

    second = restart()
    for formula_id, view in before.items():
        after = second.get_formula(formula_id)
        assert after.status == view.status
        assert after.deliveries == view.deliveries
        assert (after.processed_at, after.summary) == (view.processed_at, view.summary)
        assert after.materials == view.materials
    with pytest.raises(DuplicateFormula):
        second.submit(draft("B"))
    replay = second.submit(draft("A", "15.5"), IdempotencyKey("key-a", "digest-a"))
    assert replay.replayed and replay.formula.id == a.id
    assert [m.message_id for m in second.dead_letters()] == [c.message_id]
    # Every unacknowledged message is visible again, redeliveries first,
    # keeping its delivery count.
    got = second.receive("w", 10)
    assert [(x.formula_id, x.delivery) for x in got] == [
        (a.id, before[a.id].deliveries + 1),
        (d.id, before[d.id].deliveries + 1),
    ]
    assert second.list_formulas(10).items == tuple(second.get_formula(f.id) for f in (d, b, a, c))


def test_a_message_that_used_its_last_delivery_before_a_crash_comes_back_dead(restart) -> None:
    first = restart()
    formula = first.submit(draft("A")).formula
    for _ in range(3):
        [delivery] = first.receive("w", 1)
        if _ < 2:
            first.nack(delivery.receipt)
    # The third delivery is in flight when the broker dies.
    first.close()
    second = restart()
    assert second.get_formula(formula.id).status == "failed"
    assert second.receive("w", 1) == []


class FailingJournal(SqliteJournal):
    """Fails every write while ``failing`` is set."""

    failing = False

    def write(self, changes: Sequence[Change]) -> None:
        if self.failing:
            raise OSError("disk full")
        super().write(changes)


def test_a_failed_journal_write_leaves_memory_and_file_agreeing(restart, tmp_path) -> None:
    journal = FailingJournal(tmp_path / "journal.sqlite3")
    broker = restart(journal=journal)
    kept = broker.submit(draft("kept")).formula
    journal.failing = True
    with pytest.raises(StorageFailed):
        broker.submit(draft("lost"), IdempotencyKey("k", "d"))
    assert broker.stats().formulas == 1 and broker.stats().published == 1
    journal.failing = False
    # The same make-up and key are new again, in memory and on disk.
    again = broker.submit(draft("lost"), IdempotencyKey("k", "d"))
    assert not again.replayed
    broker.close()
    reopened = restart()
    assert {f.id for f in reopened.list_formulas(10).items} == {kept.id, again.formula.id}


def test_a_failed_publish_writes_nothing_to_the_journal(restart, tmp_path, clock) -> None:
    class FailingQueue(MessageQueue):
        def publish(self, message_id: str, formula_id: str, fingerprint: str) -> None:
            raise RuntimeError("queue broke")

    queue = FailingQueue(capacity=10, visibility_timeout=30, max_deliveries=3, clock=clock)
    broker = restart(queue=queue)
    with pytest.raises(RuntimeError):
        broker.submit(draft("A"))
    broker.close()
    assert restart().stats().formulas == 0


def test_a_failed_result_write_records_nothing_and_keeps_the_lease(restart, tmp_path) -> None:
    journal = FailingJournal(tmp_path / "journal.sqlite3")
    broker = restart(journal=journal)
    formula = broker.submit(draft("A")).formula
    [delivery] = broker.receive("w", 1)
    journal.failing = True
    with pytest.raises(StorageFailed):
        broker.complete(delivery.receipt, {"x": 1})
    assert broker.get_formula(formula.id).status == "queued"
    journal.failing = False
    assert broker.complete(delivery.receipt, {"x": 1})
    broker.close()
    assert restart().get_formula(formula.id).status == "processed"


class GroupFailingJournal(SqliteJournal):
    """Fails any write that stores more than one formula."""

    def write(self, changes: Sequence[Change]) -> None:
        if sum(isinstance(change, StoreFormula) for change in changes) > 1:
            raise OSError("disk full")
        super().write(changes)


def test_a_group_whose_commit_fails_is_answered_one_submit_at_a_time(restart, tmp_path) -> None:
    journal = GroupFailingJournal(tmp_path / "journal.sqlite3")
    broker = restart(journal=journal)
    # One group, so one write for all four; it fails, and each is run again alone.
    answers = broker.submit_many([(draft(tag), None) for tag in ("a", "b", "b", "c")])
    outcomes = {
        label: answer.formula.id if isinstance(answer, Submission) else answer
        for label, answer in zip(("first", "b", "b again", "c"), answers, strict=True)
    }

    duplicate = outcomes["b again"]
    assert isinstance(duplicate, DuplicateFormula)
    assert duplicate.existing_id == outcomes["b"]
    stats = broker.stats()
    assert (stats.formulas, stats.submitted, stats.duplicates, stats.published) == (3, 3, 1, 3)
    broker.close()
    reopened = restart()
    stored = {f.id for f in reopened.list_formulas(10).items}
    assert stored == {outcomes["first"], outcomes["b"], outcomes["c"]}
