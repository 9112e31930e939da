"""The broker contract: what every engine promises, whichever transport reaches it.

Each test runs against every engine in ``ENGINES``, opened by
``broker.engines.open_engine`` from settings alone, both as the object itself
and through a real ``multiprocessing.managers`` server and ``BrokerClient``
(which catches a method the server does not expose, a result or an error
that does not pickle, and an error that loses its fields).

Nothing here reads an engine's insides: receipts and cursors are opaque, and
time passes for real. Time-dependent promises (lease expiry, delayed nacks,
key expiry) use short settings and wait on a condition with a deadline, so an
engine on another machine's clock (a database's) is tested the same way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from broker.apikeys import MAX_NAME, digest, parse_secret
from broker.client import BrokerClient
from broker.engines import open_engine
from broker.errors import (
    ApiKeyNotFound,
    DuplicateFormula,
    FormulaNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidSummary,
    MessageNotFound,
    QueueFull,
    StaleReceipt,
)
from broker.formula import parse_formula
from broker.interface import (
    METHODS,
    Broker,
    ConsumerBroker,
    IdempotencyKey,
    OperatorBroker,
    Submission,
    SubmissionBroker,
)
from broker.settings import Settings
from broker.transport import make_server
from tests.support import environment, wait_for

Cleanup = Callable[[], None]


def _embedded_memory(request: pytest.FixtureRequest, directory: Path) -> tuple[str, Cleanup]:
    return ":memory:", lambda: None


def _embedded_sqlite(request: pytest.FixtureRequest, directory: Path) -> tuple[str, Cleanup]:
    return str(directory / "journal.sqlite3"), lambda: None


def _postgres(request: pytest.FixtureRequest, directory: Path) -> tuple[str, Cleanup]:
    # A database of its own for each broker opened, on the session's throwaway server.
    server = request.getfixturevalue("postgres_server")
    dsn: str = server.create_database()
    return dsn, lambda: server.drop_database(dsn)


# Each engine as FORMULARY_DATA names it, and what to remove once it is closed.
ENGINES = {
    "embedded-memory": _embedded_memory,
    "embedded-sqlite": _embedded_sqlite,
    "postgres": _postgres,
}
TRANSPORTS = ("object", "manager")

# Short enough to wait out, long enough that a busy machine never expires a
# lease a test still means to hold.
SHORT = 0.4

OpenBroker = Callable[..., Any]


@pytest.fixture(
    params=[(engine, transport) for engine in ENGINES for transport in TRANSPORTS],
    ids=lambda p: "-".join(p),
)
def open_broker(request: pytest.FixtureRequest) -> Iterator[OpenBroker]:
    """Opens a broker with the given settings; everything opened is closed at the end."""
    engine, transport = request.param
    cleanups: list[Callable[[], None]] = []

    def open_one(**overrides: Any) -> Any:
        env = contextlib.ExitStack()
        cleanups.append(env.close)
        directory = env.enter_context(environment())
        data, remove = ENGINES[engine](request, directory.directory)
        cleanups.append(remove)
        chosen = {"queue_capacity": 3, "visibility_timeout": 30.0, "max_deliveries": 2}
        settings = Settings(
            broker_address=str(directory.directory / "broker.sock"),
            authkey_file=directory.directory / "authkey",
            data=data,
            **(chosen | overrides),
        )
        broker = open_engine(settings)
        cleanups.append(broker.close)
        if transport == "object":
            return broker
        server = make_server(broker, settings)
        thread = threading.Thread(target=serve, args=(server,), daemon=True)
        thread.start()
        client = BrokerClient(settings)

        def stop() -> None:
            client.close()
            server.stop_event.set()
            thread.join(5)
            server.listener.close()

        cleanups.append(stop)
        return client

    yield open_one
    for cleanup in reversed(cleanups):
        cleanup()


@pytest.fixture
def remote(open_broker: OpenBroker) -> Any:
    return open_broker()


def serve(server: Any) -> None:
    # serve_forever ends with sys.exit(0), meant for a process of its own.
    with contextlib.suppress(SystemExit):
        server.serve_forever()


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call in a thread of its own, all released together by a barrier.

    Returns what each returned, or the exception it raised, in the calls' order;
    fails if any has not returned within 30 s.
    """
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a call did not return in 30 s"
    return results


def draft(name: str, *materials: tuple[str, str]) -> Any:
    parts = ", ".join(f'{{"name": "{m}", "concentration": {c}}}' for m, c in materials)
    return parse_formula(f'{{"name": "{name}", "materials": [{parts}]}}'.encode())


ROSE = draft("Rose", ("Rose Absolute", "15.5"), ("Musk", "0.000001"))
VETIVER = draft("Other", ("Vetiver", "3"))


def test_every_broker_method_is_in_the_one_list_and_answers(remote) -> None:
    _typed: Broker = remote
    _api: SubmissionBroker = remote
    _worker: ConsumerBroker = remote
    _admin: OperatorBroker = remote
    public = {name for name in dir(Broker) if not name.startswith("_")}
    assert set(METHODS) == public
    for name in METHODS:
        assert callable(getattr(remote, name))
    assert {name for name, read_only in METHODS.items() if read_only} == {
        "ping",
        "get_formula",
        "get_formulas",
        "list_formulas",
        "stats",
        "message_info",
        "dead_letters",
        "authenticate",
        "list_keys",
    }


def test_submit_then_read_back_exactly(remote) -> None:
    assert remote.ping() is True
    formula = remote.submit(ROSE).formula
    assert remote.get_formula(formula.id) == formula
    assert formula.status == "queued" and formula.deliveries == 0
    assert [m.concentration for m in formula.materials] == [Decimal("15.5"), Decimal("0.000001")]
    page = remote.list_formulas(10)
    assert page.items == (formula,) and page.next_cursor is None


def test_errors_cross_with_their_fields(remote) -> None:
    formula = remote.submit(ROSE, IdempotencyKey("k", "d")).formula
    with pytest.raises(DuplicateFormula) as dup:
        remote.submit(ROSE)
    assert (dup.value.existing_id, dup.value.fingerprint) == (formula.id, formula.fingerprint)
    with pytest.raises(IdempotencyKeyReused):
        remote.submit(ROSE, IdempotencyKey("k", "other"))
    with pytest.raises(FormulaNotFound):
        remote.get_formula("nope")
    with pytest.raises(InvalidCursor):
        remote.list_formulas(10, "nope")
    with pytest.raises(StaleReceipt):
        remote.nack("nope")
    with pytest.raises(StaleReceipt):
        remote.ack("not a receipt this broker handed out")
    with pytest.raises(MessageNotFound):
        remote.message_info("nope")
    with pytest.raises(MessageNotFound):
        remote.redrive("nope")
    with pytest.raises(ApiKeyNotFound) as unknown:
        remote.revoke_key("nope")
    assert unknown.value.key_id == "nope"


def test_an_idempotency_key_replays_its_first_answer_exactly(remote) -> None:
    accepted = remote.submit(ROSE, IdempotencyKey("k1", "d"))
    [delivery] = remote.receive("w", 1)
    remote.complete(delivery.receipt, {"n": 1})
    again = remote.submit(ROSE, IdempotencyKey("k1", "d"))
    # The answer as first given (queued, undelivered), not the formula as it is now.
    assert again.replayed and again.formula == accepted.formula
    with pytest.raises(DuplicateFormula) as first:
        remote.submit(ROSE, IdempotencyKey("k2", "d"))
    with pytest.raises(DuplicateFormula) as replayed:
        remote.submit(ROSE, IdempotencyKey("k2", "d"))
    assert not first.value.replayed and replayed.value.replayed
    assert replayed.value.existing_id == accepted.formula.id
    assert remote.stats().published == 1


def test_idempotency_keys_are_forgotten_after_their_time(open_broker) -> None:
    broker = open_broker(idempotency_ttl=SHORT)
    broker.submit(ROSE, IdempotencyKey("k", "d"))
    assert broker.submit(ROSE, IdempotencyKey("k", "d")).replayed

    def forgotten() -> bool:
        try:
            broker.submit(ROSE, IdempotencyKey("k", "another body"))
        except IdempotencyKeyReused:
            return False
        except DuplicateFormula as exc:
            return not exc.replayed
        return False

    wait_for(forgotten, what="the key to be forgotten")


def test_an_idempotency_key_belongs_to_the_api_key_that_sent_it(remote) -> None:
    rose = remote.submit(ROSE, IdempotencyKey("k", "rose", owner="alice"))
    # The same string from another owner is another key: its own body, its own answer.
    vetiver = remote.submit(VETIVER, IdempotencyKey("k", "vetiver", owner="bob"))
    assert not rose.replayed and not vetiver.replayed
    assert rose.formula.id != vetiver.formula.id
    again = remote.submit(ROSE, IdempotencyKey("k", "rose", owner="alice"))
    assert again == replace(rose, replayed=True)
    assert remote.submit(VETIVER, IdempotencyKey("k", "vetiver", owner="bob")).replayed
    with pytest.raises(IdempotencyKeyReused):
        remote.submit(VETIVER, IdempotencyKey("k", "vetiver", owner="alice"))
    # No API key (FORMULARY_AUTH=off) is one more owner: this key is new to it.
    with pytest.raises(DuplicateFormula) as first:
        remote.submit(ROSE, IdempotencyKey("k", "rose"))
    assert not first.value.replayed
    with pytest.raises(DuplicateFormula) as replayed:
        remote.submit(ROSE, IdempotencyKey("k", "rose"))
    assert replayed.value.replayed
    [by_carol, by_dave] = remote.submit_many(
        [
            (VETIVER, IdempotencyKey("k2", "vetiver", owner="carol")),
            (VETIVER, IdempotencyKey("k2", "other body", owner="dave")),
        ]
    )
    assert isinstance(by_carol, DuplicateFormula) and isinstance(by_dave, DuplicateFormula)
    assert remote.stats().formulas == 2 and remote.stats().published == 2


def test_submit_many_answers_each_submit_as_if_it_were_alone(remote) -> None:
    outcomes = remote.submit_many(
        [
            (ROSE, IdempotencyKey("k", "d")),
            (ROSE, None),
            (VETIVER, None),
            (VETIVER, IdempotencyKey("k", "another body")),
        ]
    )
    first, duplicate, second, reused = outcomes
    assert isinstance(first, Submission) and isinstance(second, Submission)
    assert isinstance(duplicate, DuplicateFormula) and duplicate.existing_id == first.formula.id
    assert isinstance(reused, IdempotencyKeyReused)
    assert remote.stats().formulas == 2 and remote.stats().published == 2
    assert remote.submit_many([]) == []


def test_a_group_without_keys_is_answered_one_submit_after_another(open_broker) -> None:
    # The PostgreSQL engine stores such a group with one INSERT: the answers must still be those
    # of each submit in turn, the queue's room going to the earliest, in group order.
    broker = open_broker(queue_capacity=4)
    known = broker.submit(draft("Known", ("Known", "1"))).formula
    a, b, c = (draft(name, (name, "2")) for name in ("A", "B", "C"))
    known_again, d = draft("Known again", ("known", "1.0")), draft("D", ("D", "2"))
    group = [a, known_again, a, b, c, d, c, b]
    outcomes = broker.submit_many([(makeup, None) for makeup in group])
    first_a, again_known, again_a, first_b, first_c, full, again_c, again_b = outcomes
    for outcome, makeup in ((first_a, a), (first_b, b), (first_c, c)):
        assert isinstance(outcome, Submission) and outcome.formula.name == makeup.name
        assert outcome.formula.materials == makeup.materials and outcome.formula.status == "queued"
    assert isinstance(full, QueueFull) and full.capacity == 4
    for duplicate, first in ((again_known, known), (again_a, first_a.formula)):
        assert isinstance(duplicate, DuplicateFormula) and duplicate.existing_id == first.id
        assert duplicate.fingerprint == first.fingerprint and not duplicate.replayed
    for duplicate, first in ((again_b, first_b.formula), (again_c, first_c.formula)):
        assert isinstance(duplicate, DuplicateFormula) and duplicate.existing_id == first.id
    stats = broker.stats()
    assert (stats.formulas, stats.published, stats.depth) == (4, 4, 4)
    assert (stats.duplicates, stats.refused_capacity) == (4, 1)
    stored = [known, first_a.formula, first_b.formula, first_c.formula]
    assert [f.id for f in broker.list_formulas(10).items] == [f.id for f in reversed(stored)]
    assert [d.formula_id for d in broker.receive("w", 10, None, 0)] == [f.id for f in stored]


def test_groups_racing_on_the_same_make_ups_store_each_once(open_broker) -> None:
    # Four callers at once, each with a group of the same six make-ups in its own order (the
    # embedded engine serialises them; PostgreSQL runs them on four connections at once).
    broker = open_broker(queue_capacity=100)
    makeups = [draft(f"F{i}", (f"M{i}", "1")) for i in range(6)]
    orders = [makeups, makeups[::-1], makeups[3:] + makeups[:3], makeups[1::2] + makeups[::2]]
    answers = at_once(
        [lambda order=order: broker.submit_many([(m, None) for m in order]) for order in orders]
    )
    stored: dict[str, str] = {}
    for n, outcomes in enumerate(answers):
        for makeup, outcome in zip(orders[n], outcomes, strict=True):
            if isinstance(outcome, Submission):
                assert makeup.fingerprint not in stored, "a make-up was accepted twice"
                stored[makeup.fingerprint] = outcome.formula.id
    assert set(stored) == {m.fingerprint for m in makeups}
    for n, outcomes in enumerate(answers):
        for makeup, outcome in zip(orders[n], outcomes, strict=True):
            if isinstance(outcome, DuplicateFormula):
                assert outcome.existing_id == stored[makeup.fingerprint]
            else:
                assert isinstance(outcome, Submission)
    stats = broker.stats()
    assert (stats.formulas, stats.published, stats.depth, stats.duplicates) == (6, 6, 6, 18)


def test_concurrent_submits_each_get_their_own_answer(remote) -> None:
    # Through the client these share round trips (the queue holds 3); each thread still gets the
    # answer to its own submit, and a make-up is stored once.
    makeups = [draft(f"F{i}", (f"M{i % 3}", "1")) for i in range(16)]
    results = at_once([lambda m=m: remote.submit(m).formula.fingerprint for m in makeups])
    accepted = [r for r in results if isinstance(r, str)]
    assert sorted(accepted) == sorted({d.fingerprint for d in makeups})
    for i, outcome in enumerate(results):
        if not isinstance(outcome, str):
            assert isinstance(outcome, DuplicateFormula), outcome
            assert outcome.fingerprint == makeups[i].fingerprint
    assert remote.stats().formulas == 3 and remote.stats().duplicates == 13


def test_a_group_with_new_keys_records_the_answer_each_key_got(open_broker) -> None:
    # PostgreSQL stores such a group with one INSERT too, then records its keys: each key must
    # replay the answer its submit got, and a key whose submit met a full queue is not kept.
    broker = open_broker(queue_capacity=3)
    broker.submit(draft("Known", ("Known", "1")))
    a, b, c = (draft(name, (name, "2")) for name in ("A", "B", "C"))
    first, again, plain, full = broker.submit_many(
        [
            (a, IdempotencyKey("k1", "a")),
            (a, IdempotencyKey("k2", "a")),
            (b, None),
            (c, IdempotencyKey("k3", "c")),
        ]
    )
    assert isinstance(first, Submission) and isinstance(plain, Submission)
    assert isinstance(again, DuplicateFormula) and again.existing_id == first.formula.id
    assert isinstance(full, QueueFull)
    assert broker.submit(a, IdempotencyKey("k1", "a")) == replace(first, replayed=True)
    with pytest.raises(DuplicateFormula) as replayed:
        broker.submit(a, IdempotencyKey("k2", "a"))
    assert replayed.value.replayed and replayed.value.existing_id == first.formula.id
    with pytest.raises(IdempotencyKeyReused):
        broker.submit(b, IdempotencyKey("k1", "b"))
    [delivery] = broker.receive("w", 1)
    assert broker.ack(delivery.receipt) is True
    retried = broker.submit(c, IdempotencyKey("k3", "c"))
    assert not retried.replayed and retried.formula.name == "C"


def test_groups_racing_with_the_same_keys_give_each_key_one_answer(open_broker) -> None:
    # Four callers at once send the same six keyed submits in their own orders, as a client
    # retrying through several hosts would: each key is answered 202 once, and replayed after.
    broker = open_broker(queue_capacity=100)
    submits = [
        (draft(f"F{i}", (f"M{i}", "1")), IdempotencyKey(f"k{i}", f"body{i}")) for i in range(6)
    ]
    orders = [submits, submits[::-1], submits[3:] + submits[:3], submits[1::2] + submits[::2]]
    answers = at_once([lambda order=order: broker.submit_many(order) for order in orders])
    by_key: dict[str, list[Submission]] = {}
    for n, outcomes in enumerate(answers):
        for (_, key), outcome in zip(orders[n], outcomes, strict=True):
            assert isinstance(outcome, Submission), outcome
            by_key.setdefault(key.key, []).append(outcome)
    for key, outcomes in by_key.items():
        assert len({o.formula.id for o in outcomes}) == 1, key
        assert sorted(o.replayed for o in outcomes) == [False, True, True, True], key
    stats = broker.stats()
    assert (stats.formulas, stats.published, stats.depth) == (6, 6, 6)


def test_concurrent_reads_each_get_their_own_answer(remote) -> None:
    # Through the client, reads made at once share round trips (one get_formulas); each thread
    # still gets its own formula, or FormulaNotFound naming its own id.
    ids = [remote.submit(draft(f"F{i}", (f"M{i}", "1"))).formula.id for i in range(3)]
    wanted = [*ids, "no-such-formula"] * 4
    results = at_once([lambda w=w: remote.get_formula(w).id for w in wanted])
    for i, result in enumerate(results):
        if wanted[i] in ids:
            assert result == wanted[i]
        else:
            assert isinstance(result, FormulaNotFound) and result.formula_id == wanted[i]


def test_capacity_refuses_with_queue_full_until_a_message_is_acked(remote) -> None:
    for i in range(3):
        remote.submit(draft(f"F{i}", (f"M{i}", "1")))
    with pytest.raises(QueueFull) as full:
        remote.submit(draft("F4", ("M4", "1")))
    assert full.value.capacity == 3
    assert remote.stats().refused_capacity == 1 and remote.stats().formulas == 3
    [delivery] = remote.receive("w", 1)
    assert remote.ack(delivery.receipt) is True
    remote.submit(draft("F4", ("M4", "1")))


def test_pages_run_newest_first_and_cursors_survive_new_formulas(open_broker) -> None:
    broker = open_broker(queue_capacity=20)
    ids = [broker.submit(draft(f"F{i}", (f"M{i}", "1"))).formula.id for i in range(5)]
    first = broker.list_formulas(2)
    assert [f.id for f in first.items] == [ids[4], ids[3]] and first.next_cursor
    broker.submit(draft("Later", ("Later", "1")))
    second = broker.list_formulas(2, first.next_cursor)
    third = broker.list_formulas(2, second.next_cursor)
    assert [f.id for f in second.items + third.items] == [ids[2], ids[1], ids[0]]
    assert third.next_cursor is None


def test_a_delivery_is_leased_completed_and_shown_processed(remote) -> None:
    formula = remote.submit(ROSE).formula
    before = time.time()
    [delivery] = remote.receive("w1", 5, None, 0)
    assert (delivery.formula_id, delivery.delivery) == (formula.id, 1)
    # Lease times are wall-clock epoch seconds, whatever clock the engine keeps.
    assert before + 29 <= delivery.lease_expires_at <= time.time() + 31
    assert time.time() + 59 <= remote.extend(delivery.receipt, 60) <= time.time() + 61
    summary = {"material_count": 2, "total_concentration": Decimal("15.500001")}
    assert remote.complete(delivery.receipt, summary) is True
    done = remote.get_formula(formula.id)
    assert done.status == "processed" and done.summary == summary and done.deliveries == 1
    assert remote.ack(delivery.receipt) is False  # a repeated ack is harmless
    stats = remote.stats()
    assert (stats.acked, stats.processed, stats.depth, stats.in_flight) == (1, 1, 0, 0)


def test_receive_waits_for_a_submit_instead_of_spinning(remote) -> None:
    assert remote.receive("w", 1, None, 0) == []
    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.extend(remote.receive("w", 1, None, 20)))
    waiting.start()
    formula = remote.submit(ROSE).formula
    waiting.join(timeout=15)
    assert [d.formula_id for d in got] == [formula.id]


def test_an_expired_lease_redelivers_first_then_dead_letters_and_redrives(remote) -> None:
    first = remote.submit(ROSE).formula
    second = remote.submit(VETIVER).formula
    [lease] = remote.receive("w1", 1, SHORT, 0)
    assert lease.formula_id == first.id
    expired = lambda: remote.message_info(first.message_id).state == "ready"  # noqa: E731
    wait_for(expired, what="the lease to run out")
    # Back, and ahead of the fresh message.
    again = remote.receive("w2", 1, None, 0)
    assert [(d.formula_id, d.delivery) for d in again] == [(first.id, 2)]
    assert remote.message_info(first.message_id).state == "in_flight"
    with pytest.raises(StaleReceipt):
        remote.ack(lease.receipt)
    with pytest.raises(StaleReceipt):
        remote.complete(lease.receipt, {"n": 1})
    remote.nack(again[0].receipt, 0)  # its last allowed delivery: dead-lettered
    assert remote.get_formula(first.id).status == "failed"
    [dead] = remote.dead_letters(10)
    assert dead.message_id == first.message_id and dead.state == "dead"
    assert remote.stats().dead == 1
    remote.redrive(first.message_id)
    assert remote.get_formula(first.id).status == "queued"
    got = remote.receive("w3", 10, None, 0)
    assert [(d.formula_id, d.delivery) for d in got] == [(second.id, 1), (first.id, 1)]
    assert remote.redrive_all() == 0
    assert remote.get_formula(first.id).deliveries == 3  # over its whole life


def test_a_delayed_nack_hides_the_message_until_its_delay_is_over(remote) -> None:
    formula = remote.submit(ROSE).formula
    [delivery] = remote.receive("w", 1)
    remote.nack(delivery.receipt, SHORT)
    info = remote.message_info(formula.message_id)
    assert info.state == "delayed" and info.visible_at is not None
    assert time.time() < info.visible_at <= time.time() + SHORT + 1
    assert remote.receive("w", 1, None, 0) == []
    back = wait_for(lambda: remote.receive("w", 1, None, 0), what="the delay to be over")
    assert [(d.formula_id, d.delivery) for d in back] == [(formula.id, 2)]


def test_a_nack_without_delay_redelivers_at_once(remote) -> None:
    formula = remote.submit(ROSE).formula
    [delivery] = remote.receive("w", 1)
    remote.nack(delivery.receipt)
    [again] = remote.receive("w", 1, None, 0)
    assert (again.formula_id, again.delivery) == (formula.id, 2)
    assert again.receipt != delivery.receipt


def test_a_batch_is_read_and_completed_in_one_call_each(remote) -> None:
    first = remote.submit(ROSE).formula
    second = remote.submit(VETIVER).formula
    [held] = remote.receive("w1", 1, None, 0)
    [brief] = remote.receive("w1", 1, SHORT, 0)
    views = remote.get_formulas([held.formula_id, brief.formula_id, "nope"])
    assert [v.id if v else None for v in views] == [first.id, second.id, None]
    # brief's lease runs out and the message goes to w2.
    [again] = wait_for(lambda: remote.receive("w2", 10, None, 0), what="the lease to run out")
    outcomes = remote.complete_many(
        [
            (held.receipt, {"n": Decimal("1.5")}),
            (held.receipt, {"n": 2}),  # the same message twice in one batch
            (brief.receipt, {"n": 3}),  # stale: w2 holds it now
            (again.receipt, {"n": Decimal("4")}),
        ]
    )
    assert outcomes == ["completed", "already_acked", "stale", "completed"]
    assert remote.get_formula(first.id).summary == {"n": Decimal("1.5")}
    assert remote.get_formula(second.id).summary == {"n": Decimal("4")}
    assert remote.stats().processed == 2


def test_a_last_lease_that_runs_out_dead_letters_its_message(remote) -> None:
    formula = remote.submit(ROSE).formula
    [lease] = remote.receive("w1", 1, SHORT, 0)
    # max_deliveries is 2: once the first lease runs out, the second is the last.
    [lease] = wait_for(lambda: remote.receive("w2", 1, SHORT, 0), what="the first to run out")
    wait_for(lambda: remote.get_formula(formula.id).status == "failed", what="the lease to end")
    assert remote.message_info(formula.message_id).state == "dead"
    assert [d.message_id for d in remote.dead_letters()] == [formula.message_id]
    assert remote.stats().dead == 1 and remote.stats().depth == 0
    with pytest.raises(StaleReceipt):
        remote.ack(lease.receipt)
    assert remote.receive("w3", 1, None, 0) == []


def test_extend_keeps_a_lease_and_an_expired_one_cannot_be_extended(remote) -> None:
    formula = remote.submit(ROSE).formula
    [delivery] = remote.receive("w1", 1, SHORT, 0)
    info = remote.message_info(formula.message_id)
    assert (info.state, info.consumer, info.deliveries) == ("in_flight", "w1", 1)
    assert info.visible_at is not None and info.visible_at <= time.time() + SHORT + 1
    remote.extend(delivery.receipt, 30)
    assert remote.message_info(formula.message_id).visible_at > time.time() + 25
    assert remote.receive("w2", 1, None, 0) == []  # still w1's
    remote.extend(delivery.receipt, SHORT)
    wait_for(lambda: remote.message_info(formula.message_id).state == "ready", what="expiry")
    with pytest.raises(StaleReceipt):
        remote.extend(delivery.receipt, 30)
    with pytest.raises(StaleReceipt):
        remote.nack(delivery.receipt)
    info = remote.message_info(formula.message_id)
    assert (info.state, info.consumer, info.visible_at) == ("ready", None, None)


def test_consumers_racing_for_messages_each_get_different_ones(open_broker) -> None:
    broker = open_broker(queue_capacity=100)
    submitted = {broker.submit(draft(f"F{i}", (f"M{i}", "1"))).formula.id for i in range(40)}

    def consume(name: str) -> list[str]:
        got: list[str] = []
        while batch := broker.receive(name, 3, None, 0):
            got.extend(d.formula_id for d in batch)
        return got

    each = at_once([lambda name=f"w{i}": consume(name) for i in range(4)])
    assert sorted(id_ for got in each for id_ in got) == sorted(submitted)
    assert broker.stats().in_flight == 40 and broker.stats().delivered == 40


def test_fresh_messages_come_in_the_order_they_were_published(open_broker) -> None:
    broker = open_broker(queue_capacity=10)
    ids = [broker.submit(draft(f"F{i}", (f"M{i}", "1"))).formula.id for i in range(5)]
    first = broker.receive("w", 2, None, 0)
    rest = broker.receive("w", 10, None, 0)
    assert [d.formula_id for d in first + rest] == ids


def test_receive_with_nothing_to_give_returns_empty_once_its_wait_is_over(remote) -> None:
    started = time.monotonic()
    assert remote.receive("w", 1, None, SHORT) == []
    assert SHORT <= time.monotonic() - started < SHORT + 5


def test_a_summary_json_cannot_hold_records_nothing_and_the_others_are_recorded(remote) -> None:
    first = remote.submit(ROSE).formula
    second = remote.submit(VETIVER).formula
    [a, b] = remote.receive("w", 2, None, 0)
    with pytest.raises(InvalidSummary):
        remote.complete(a.receipt, {"n": float("nan")})
    assert remote.get_formula(first.id).status == "queued"
    assert remote.complete_many([(a.receipt, {"n": float("inf")}), (b.receipt, {"n": 2})]) == [
        "invalid_summary",
        "completed",
    ]
    assert remote.get_formula(second.id).summary == {"n": 2}
    assert remote.message_info(first.message_id).state == "in_flight"


def test_dead_letters_leave_room_in_the_queue_and_a_redrive_is_never_refused(open_broker) -> None:
    broker = open_broker(queue_capacity=1, max_deliveries=1)
    rose = broker.submit(ROSE).formula
    [delivery] = broker.receive("w", 1, None, 0)
    broker.nack(delivery.receipt)  # its only delivery: dead
    vetiver = broker.submit(VETIVER).formula  # the dead letter takes no room
    with pytest.raises(QueueFull):
        broker.submit(draft("Third", ("Oud", "1")))
    assert broker.redrive_all() == 1  # back, though the queue is full
    assert broker.stats().depth == 2 and broker.stats().redriven == 1
    got = broker.receive("w", 10, None, 0)
    assert [d.formula_id for d in got] == [vetiver.id, rose.id]


def test_dead_letters_are_listed_oldest_first_up_to_a_limit(open_broker) -> None:
    broker = open_broker(queue_capacity=10, max_deliveries=1)
    ids = []
    for i in range(3):
        formula = broker.submit(draft(f"F{i}", (f"M{i}", "1"))).formula
        [delivery] = broker.receive("w", 1, None, 0)
        broker.nack(delivery.receipt)
        ids.append(formula.message_id)
    assert [d.message_id for d in broker.dead_letters()] == ids
    assert [d.message_id for d in broker.dead_letters(2)] == ids[:2]
    assert broker.dead_letters(0) == []
    assert broker.stats().dead_lettered == 3


def test_the_embedded_file_engine_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    # Not every engine has a file to reopen; this promise is the embedded engine's.
    settings = Settings(data=str(tmp_path / "journal.sqlite3"))
    broker = open_engine(settings)
    accepted = broker.submit(ROSE, IdempotencyKey("k", "d"))
    owned = broker.submit(VETIVER, IdempotencyKey("k", "other", owner="alice"))
    kept = broker.create_key("kept", ["submit"])
    gone = broker.create_key("gone", ["read"])
    broker.revoke_key(gone.key.id)
    keys = broker.list_keys()
    broker.close()
    reopened = open_engine(settings)
    try:
        assert reopened.submit(ROSE, IdempotencyKey("k", "d")) == Submission(
            accepted.formula, replayed=True
        )
        assert reopened.submit(VETIVER, IdempotencyKey("k", "other", owner="alice")) == replace(
            owned, replayed=True
        )
        assert reopened.list_keys() == keys
        assert reopened.authenticate(kept.key.id, digest(kept.secret)) == kept.key
        assert reopened.authenticate(gone.key.id, digest(gone.secret)) is None
        [delivery] = reopened.receive("w", 1)
        assert delivery.formula_id == accepted.formula.id
    finally:
        reopened.close()


# -- API keys ----------------------------------------------------------------------


def seconds(moment: str) -> float:
    """An RFC 3339 time as the engines write it (``...Z``), as epoch seconds."""
    assert moment.endswith("Z")
    return datetime.fromisoformat(moment).timestamp()


def test_a_key_is_made_listed_and_revoked_and_only_its_live_secret_lets_it_in(remote) -> None:
    made = remote.create_key("ci", ["read", "submit"])
    key = made.key
    assert (key.name, key.scopes, key.revoked_at) == ("ci", ("submit", "read"), None)
    assert abs(seconds(key.created_at) - time.time()) < 60
    assert parse_secret(made.secret) == (key.id, digest(made.secret))
    assert made.secret not in repr(made)
    assert remote.authenticate(key.id, digest(made.secret)) == key
    assert remote.authenticate(key.id, digest(made.secret + "x")) is None
    assert remote.authenticate(key.id, "") is None
    assert remote.authenticate(key.id, "é" * 64) is None
    assert remote.authenticate("no-such-key", digest(made.secret)) is None
    scraper = remote.create_key("scraper", ["metrics"])
    assert scraper.key.id != key.id and scraper.secret != made.secret
    assert remote.list_keys() == [key, scraper.key]

    remote.revoke_key(key.id)

    assert remote.authenticate(key.id, digest(made.secret)) is None
    assert remote.authenticate(scraper.key.id, digest(scraper.secret)) == scraper.key
    revoked, still = remote.list_keys()
    assert revoked == replace(key, revoked_at=revoked.revoked_at) and still == scraper.key
    assert revoked.revoked_at is not None
    assert seconds(key.created_at) <= seconds(revoked.revoked_at) <= time.time() + 60
    remote.revoke_key(key.id)  # again: harmless, and the first time stays
    assert remote.list_keys()[0] == revoked


def test_a_key_needs_a_name_and_known_scopes(remote) -> None:
    made = remote.create_key(f"  {'n' * MAX_NAME}  ", ["METRICS", " read", "read"])
    assert (made.key.name, made.key.scopes) == ("n" * MAX_NAME, ("read", "metrics"))
    refused = [
        ("", ["read"]),
        ("   ", ["read"]),
        ("n" * (MAX_NAME + 1), ["read"]),
        ("bell\a", ["read"]),
        ("ci", ["admin"]),
        ("ci", ["read", "everything"]),
        ("ci", []),
    ]
    for name, scopes in refused:
        with pytest.raises(ValueError):
            remote.create_key(name, scopes)
    assert remote.list_keys() == [made.key]


def test_without_a_rate_limit_every_call_may_go_ahead(remote) -> None:
    assert [remote.rate_limit("k") for _ in range(20)] == [0.0] * 20


def test_a_key_past_its_burst_is_told_how_long_to_wait_and_others_are_not(open_broker) -> None:
    broker = open_broker(rate_limit=2.0)
    assert [broker.rate_limit("a"), broker.rate_limit("a")] == [0.0, 0.0]
    wait = broker.rate_limit("a")
    assert 0.0 < wait <= 0.5
    assert broker.rate_limit("b") == 0.0
    # A refused call spends nothing, so asking again until the token is back is fair.
    wait_for(lambda: broker.rate_limit("a") == 0.0, timeout=wait + 5, what="a token back")
