"""The PostgreSQL engine's statements stay index lookups however its tables grow.

PostgreSQL only: plans are the database's own. A broker's pooled connections
live for hours and keep the plans they made, so a plan chosen while a table
held a handful of rows (a sequential scan is the cheapest way to read ten
rows) is used still when it holds millions, until the table is analyzed
again. A statement that scans ``formulas`` or ``messages`` then costs in
proportion to the data: in one such regression (3dc23eb), a submit cost the
database five times as much after 4,000 formulas and 25 times after 12,000.

This test makes those conditions on purpose: autovacuum off on the engine's
tables, every call made several times while they are empty (so each cached
plan is a generic one made for empty tables), then the tables grown through
the engine itself. Then it reads the plans of every call with auto_explain
and lists any sequential scan of a table that grows with the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import psycopg
import pytest

from broker.formula import parse_formula
from broker.interface import FormulaDraft, IdempotencyKey, Submission
from broker.settings import Settings

if TYPE_CHECKING:
    from broker.engines.postgres.service import PostgresBroker

pytestmark = pytest.mark.slow

GROWING: Final = ("formulas", "messages", "idempotency_keys")
"""The tables that grow with the data; the others hold a few rows by design."""
CACHED_AFTER: Final = 6
"""Calls before a statement's plan is cached for good: PostgreSQL makes a generic
plan after five custom ones and keeps it while it looks no dearer."""
MAX_DELIVERIES: Final = 2
DELIBERATE: Final = ("One pass over the messages",)
"""Plans that read a growing table whole on purpose, by a phrase of their query's
comment: the gauges of ``stats`` (and /metrics) count the queue by state in one pass."""
SEQ_SCAN: Final = re.compile(r"Seq Scan on (?:formulary\.)?(\w+)")


def draft(tag: str, n: int) -> FormulaDraft:
    text = (
        f'{{"name": "F {tag} {n}", "materials": [{{"name": "Note {tag} {n}", '
        f'"concentration": 1.5}}, {{"name": "Musk", "concentration": 2}}]}}'
    )
    return parse_formula(text.encode())


def keyed(tag: str, n: int) -> tuple[FormulaDraft, IdempotencyKey]:
    return draft(tag, n), IdempotencyKey(f"key {tag} {n}", f"digest {tag} {n}")


@pytest.fixture
def engine(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PostgresBroker]:
    from psycopg_pool import ConnectionPool

    from broker.engines.postgres import open_postgres, pool, service

    def one_connection(*args: Any, **kwargs: Any) -> Any:
        # Every call below plans on this one connection, so the plans the
        # warm-up cached are the ones the checked calls use.
        return ConnectionPool(*args, **{**kwargs, "min_size": 1, "max_size": 1})

    monkeypatch.setattr(pool, "ConnectionPool", one_connection)
    monkeypatch.setattr(service, "SWEEP_SECONDS", 0.0)
    settings = Settings(data=postgres_dsn, queue_capacity=1_000_000, max_deliveries=MAX_DELIVERIES)
    broker = open_postgres(settings)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        for table in GROWING:
            admin.execute(f"ALTER TABLE formulary.{table} SET (autovacuum_enabled = off)")
    try:
        yield broker
    finally:
        broker.close()


def every_call(broker: PostgresBroker, tag: str) -> None:
    """Each kind of call the engine makes, with the outcomes it has to tell apart."""
    outcomes = broker.submit_many([(draft(tag, n), None) for n in range(4)])
    broker.submit_many([(draft(tag, 10), None)])
    broker.submit_many([keyed(tag, n) for n in range(20, 24)])
    broker.submit_many([keyed(tag, 30)])
    broker.submit_many([keyed(tag, 20), (draft(tag, 0), None)])  # a replay, a duplicate
    ids = [o.formula.id for o in outcomes if isinstance(o, Submission)]
    broker.get_formulas(ids)
    page = broker.list_formulas(5)
    broker.list_formulas(5, page.next_cursor)
    deliveries = broker.receive("plans", max_messages=4, visibility_timeout=60)
    assert len(deliveries) == 4
    broker.extend(deliveries[0].receipt, 60)
    broker.complete(deliveries[0].receipt, {"material_count": 2})
    broker.complete_many([(deliveries[1].receipt, {"material_count": 2})])
    broker.message_info(deliveries[3].message_id)
    broker.ack(deliveries[3].receipt)
    broker.nack(deliveries[2].receipt)  # its first delivery of MAX_DELIVERIES
    [again] = broker.receive("plans", max_messages=1, visibility_timeout=60)
    assert again.message_id == deliveries[2].message_id  # redeliveries come first
    broker.nack(again.receipt)  # its last: a dead letter
    broker.redrive(again.message_id)
    broker.dead_letters(10)
    broker.redrive_all()
    broker.sweep()
    broker.stats()


def grow(broker: PostgresBroker, formulas: int) -> None:
    """``formulas`` more formulas, half with keys, and a queue with work in every state."""
    group = 50
    for start in range(0, formulas, group):
        broker.submit_many(
            [
                keyed("grow", n) if n % 2 else (draft("grow", n), None)
                for n in range(start, start + group)
            ]
        )
    for _ in range(20):
        deliveries = broker.receive("grower", max_messages=50, visibility_timeout=60)
        broker.complete_many([(d.receipt, {"material_count": 2}) for d in deliveries[:40]])


def test_no_call_scans_a_growing_table_with_plans_made_while_it_was_empty(
    engine: PostgresBroker,
) -> None:
    for round_ in range(CACHED_AFTER):
        every_call(engine, f"warm {round_}")
    grow(engine, 4_000)

    plans: list[str] = []
    with engine._pool.connection() as connection:
        try:
            connection.execute("LOAD 'auto_explain'")
        except psycopg.errors.UndefinedFile:
            pytest.skip("this PostgreSQL has no auto_explain module (contrib) to read plans with")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_level", "notice"),
            ("client_min_messages", "notice"),
        ):
            connection.execute(f"SET {setting} = {value}")
        connection.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    every_call(engine, "checked")

    assert len(plans) > 20, "auto_explain logged no plans: the check checked nothing"
    scans = [
        plan
        for plan in plans
        if any(table in GROWING for table in SEQ_SCAN.findall(plan))
        and not any(phrase in plan for phrase in DELIBERATE)
    ]
    assert not scans, "statements that scan a growing table:\n\n" + "\n\n".join(
        _statement_of(plan) for plan in scans
    )


def _statement_of(plan: str) -> str:
    """The plan's query text and its scan lines, enough to find the statement."""
    lines = plan.splitlines()
    text = [line for line in lines if not line.startswith(" ")][:12]
    return "\n".join(text + [line for line in lines if "Seq Scan" in line])
