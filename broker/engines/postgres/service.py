"""The PostgreSQL engine's face: every rule about state, kept in one database many brokers share.

``PostgresBroker`` implements ``broker.interface.Broker``. It holds no state
another broker would need: formulas, keys and messages live in the database,
each atomic step is one transaction (its logic in the SQL functions of
``sql/functions.sql``), and leases and delays run on the database's clock, so
brokers on many hosts serve one system whatever their own clocks say.

What this process keeps for itself: a small connection pool, the listening
connection that wakes long polls (``wakeups``), the counters of
``BrokerStats`` (totals of what *this* broker did since it started; the
gauges are the whole system's), and the token buckets of
``FORMULARY_RATE_LIMIT``: each broker limits the calls that reach it, so
across hosts a key may make up to the limit on each host.

Each call is one statement on a pooled connection in autocommit (``pool``),
so one round trip. ``convert`` makes the rows the interface's values;
``apikeys`` answers the API-key calls; the calls both engines answer alike
(``submit``, ``complete``, ``get_formula``, the bounds of ``receive`` and
``list_formulas``) are ``shared.EngineCalls``'.

Errors: a database that cannot be reached is ``BrokerUnavailable`` (the API
answers 503 with Retry-After; workers back off and retry); any other
database error in a write is ``StorageFailed``, its transaction rolled back.
A connection lost while a commit was under way leaves the outcome unknown to
this broker: the client hears ``BrokerUnavailable``, and a retry with the
same Idempotency-Key gets the one answer the database kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Final

import psycopg

from broker.engines.postgres import convert
from broker.engines.postgres.apikeys import ApiKeyTable
from broker.engines.postgres.pool import Connection, Pool, lend
from broker.engines.postgres.sql import query
from broker.engines.postgres.wakeups import Wakeups
from broker.engines.shared import (
    EngineCalls,
    TokenBuckets,
    decode_cursor,
    encode_cursor,
    new_id,
    pack_summary,
)
from broker.errors import (
    DuplicateFormula,
    MessageNotFound,
    QueueFull,
    StaleReceipt,
    StorageFailed,
)

# Both engines implement broker.interface.Broker, so the embedded engine imports
# much the same list of its types.
from broker.interface import (
    INVALID_SUMMARY,
    STALE,
    ApiKey,
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    MessageInfo,
    NewApiKey,
    Submission,
    SubmitOutcome,
    SubmitRequest,
)
from broker.settings import Settings

log = logging.getLogger(__name__)

SWEEP_SECONDS: Final = 60.0
"""How often this broker deletes a batch of expired idempotency keys."""
_NO_CURSOR: Final = 2**63 - 1


class PostgresBroker(EngineCalls):
    def __init__(
        self,
        pool: Pool,
        wakeups: Wakeups,
        settings: Settings,
        *,
        new_id: Callable[[], str] = new_id,
    ) -> None:
        self._pool = pool
        self._wakeups = wakeups
        self._capacity = settings.queue_capacity
        self._visibility_timeout = settings.visibility_timeout
        self._max_deliveries = settings.max_deliveries
        self._idempotency_ttl = settings.idempotency_ttl
        self._new_id = new_id
        self._totals: Counter[str] = Counter()  # of _TOTALS, behind _totals_lock
        self._totals_lock = threading.Lock()
        self._last_sweep = 0.0
        limit = settings.rate_limit
        self._buckets = None if limit is None else TokenBuckets(limit)
        self._api_keys = ApiKeyTable(self._connection)

    def close(self) -> None:
        """Stop listening and close the pool (the broker process calls it on exit)."""
        self._wakeups.close(nudge=self._notify)
        self._pool.close()

    # -- submissions --------------------------------------------------------------------

    def ping(self) -> bool:
        with self._connection() as connection:
            connection.execute(query("ping"))
        return True

    def authenticate(self, key_id: str, secret_digest: str) -> ApiKey | None:
        return self._api_keys.authenticate(key_id, secret_digest)

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        """Every submit of the group in one statement: one transaction, one WAL flush.

        ``formulary.submit_many`` answers each as if it ran alone after the
        ones before it (with one INSERT for a group whose Idempotency-Keys are
        all new); if the transaction fails as a whole (a deadlock between two
        groups racing on the same make-ups, or another host claiming one of
        the group's keys meanwhile), each is run again alone.
        """
        if not requests:
            return []
        try:
            return self._submit_group(requests)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            if len(requests) == 1:
                raise StorageFailed("the submit lost a race twice; retry") from None
            log.info("a group of %d submits lost a race; submitting each alone", len(requests))
        outcomes: list[SubmitOutcome] = []
        for request in requests:
            try:
                outcomes.extend(self._submit_group([request]))
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                outcomes.append(StorageFailed("the submit lost a race; retry"))
        return outcomes

    def _submit_group(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        with self._connection(passing=_RACES) as connection:
            rows = connection.execute(
                query("submit_many"),
                {
                    "group": convert.submit_group(requests, self._new_id),
                    "key_ttl": self._idempotency_ttl,
                    "capacity": self._capacity,
                },
            ).fetchall()
        outcomes = [
            convert.submit_outcome(row[1:], request, self._capacity)
            for row, request in zip(rows, requests, strict=True)
        ]
        self._count(outcomes)
        return outcomes

    def _count(self, outcomes: Sequence[SubmitOutcome]) -> None:
        new = sum(isinstance(o, Submission) and not o.replayed for o in outcomes)
        self._add(
            submitted=new,
            published=new,
            duplicates=sum(isinstance(o, DuplicateFormula) and not o.replayed for o in outcomes),
            refused_capacity=sum(isinstance(o, QueueFull) for o in outcomes),
        )

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        with self._connection() as connection:
            rows = connection.execute(
                query("formulas_by_id"),
                {"ids": list(formula_ids), "max_deliveries": self._max_deliveries},
            ).fetchall()
        views = {row[0]: convert.formula_view(row) for row in rows}
        return [views.get(formula_id) for formula_id in formula_ids]

    def _page(self, limit: int, cursor: str | None) -> FormulaPage:
        before = _NO_CURSOR if cursor is None else decode_cursor(cursor)
        with self._connection() as connection:
            rows = connection.execute(
                query("formula_page"),
                {"before": before, "limit": limit + 1, "max_deliveries": self._max_deliveries},
            ).fetchall()
        items = tuple(convert.formula_view(row) for row in rows[:limit])
        more = len(rows) > limit
        return FormulaPage(items, encode_cursor(rows[limit - 1][-1]) if more else None)

    def stats(self) -> BrokerStats:
        with self._connection() as connection:
            self._bury(connection)
            row = connection.execute(
                query("gauges"), {"max_deliveries": self._max_deliveries}
            ).fetchone()
        assert row is not None
        formulas, depth, in_flight, delayed, dead = row
        with self._totals_lock:
            totals = dict(self._totals)
        return BrokerStats(
            formulas=formulas,
            depth=depth,
            in_flight=in_flight,
            delayed=delayed,
            dead=dead,
            **{name: totals.get(name, 0) for name in _TOTALS},
        )

    # -- consumers ---------------------------------------------------------------------

    def _receive(
        self, consumer: str, max_messages: int, visibility_timeout: float | None, wait: float
    ) -> list[Delivery]:
        lease = self._visibility_timeout if visibility_timeout is None else visibility_timeout
        if not (math.isfinite(lease) and lease > 0):
            raise ValueError(
                f"visibility_timeout must be a positive number of seconds, not {lease}"
            )
        deadline = time.monotonic() + wait
        while True:
            seen = self._wakeups.generation
            deliveries, due_in = self._lease(consumer, max_messages, lease)
            remaining = deadline - time.monotonic()
            if deliveries or remaining <= 0:
                return deliveries
            # Sleep until a notice, the earliest lease or delay, or the deadline.
            self._wakeups.wait(seen, remaining if due_in is None else min(remaining, due_in))

    def _lease(
        self, consumer: str, max_messages: int, lease: float
    ) -> tuple[list[Delivery], float | None]:
        with self._connection() as connection:
            self._bury(connection)
            rows = connection.execute(
                query("lease"),
                {
                    "consumer": consumer,
                    "max": max_messages,
                    "lease_seconds": lease,
                    "max_deliveries": self._max_deliveries,
                },
            ).fetchall()
            due_in = None
            if not rows:
                due = connection.execute(query("seconds_to_next_due")).fetchone()
                due_in = None if due is None or due[0] is None else max(0.0, float(due[0]))
        # Redeliveries first, each group in the order it became visible.
        rows.sort(key=lambda row: (not row[6], row[7] if row[6] else 0, row[8]))
        deliveries = [convert.delivery(row) for row in rows]
        if deliveries:
            redelivered = sum(d.delivery > 1 for d in deliveries)
            self._add(delivered=len(deliveries), redelivered=redelivered)
        return deliveries, due_in

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Every result and ack in one statement; each receipt checked under its row lock."""
        outcomes: list[str] = []
        asked: list[tuple[int, str, str, str]] = []  # (position, message id, token, summary)
        for position, (receipt, summary) in enumerate(results):
            parts = convert.parse_receipt(receipt)
            if parts is None:
                outcomes.append(STALE)
                continue
            try:
                summary_json = pack_summary(summary)
            except (TypeError, ValueError):
                outcomes.append(INVALID_SUMMARY)
                continue
            outcomes.append("")  # answered below
            asked.append((position, *parts, summary_json))
        if not asked:
            return outcomes
        with self._connection() as connection:
            rows = connection.execute(
                query("complete_many"),
                {
                    "message_ids": [message_id for _, message_id, _, _ in asked],
                    "tokens": [token for _, _, token, _ in asked],
                    "summaries": [summary for _, _, _, summary in asked],
                },
            ).fetchall()
        answers = [outcome for _, outcome in rows]
        for (position, *_), answer in zip(asked, answers, strict=True):
            outcomes[position] = convert.COMPLETE_OUTCOMES[answer]
        recorded = answers.count("recorded")
        self._add(processed=recorded, acked=recorded + answers.count("acked"))
        return outcomes

    def ack(self, receipt: str) -> bool:
        message_id, token = self._receipt(receipt)
        with self._connection() as connection:
            row = connection.execute(
                query("complete"), {"message_id": message_id, "token": token, "summary": None}
            ).fetchone()
        assert row is not None
        if row[0] == "stale":
            raise StaleReceipt(receipt)
        if row[0] == "gone":
            return False
        self._add(acked=1)
        return True

    def nack(self, receipt: str, delay: float = 0.0) -> None:
        message_id, token = self._receipt(receipt)
        delay = float(delay)
        if not math.isfinite(delay):
            raise ValueError(f"delay must be finite, not {delay}")
        with self._connection() as connection:
            row = connection.execute(
                query("nack"),
                {
                    "message_id": message_id,
                    "token": token,
                    "delay": max(0.0, delay),
                    "max_deliveries": self._max_deliveries,
                },
            ).fetchone()
        assert row is not None
        if row[0] in ("stale", "gone"):
            raise StaleReceipt(receipt)
        self._add(nacked=1, dead_lettered=int(row[0] == "dead"))
        if row[0] == "dead":
            log.warning("dead-lettered message %s after its last delivery", message_id)
        if row[0] == "ready":
            self._wakeups.bump()

    def extend(self, receipt: str, seconds: float) -> float:
        message_id, token = self._receipt(receipt)
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a positive number of seconds, not {seconds}")
        with self._connection() as connection:
            row = connection.execute(
                query("extend"), {"message_id": message_id, "token": token, "seconds": seconds}
            ).fetchone()
        if row is None:
            raise StaleReceipt(receipt)
        return float(row[0])

    # -- operators ---------------------------------------------------------------------

    def message_info(self, message_id: str) -> MessageInfo:
        with self._connection() as connection:
            row = connection.execute(
                query("message_info"),
                {"message_id": message_id, "max_deliveries": self._max_deliveries},
            ).fetchone()
        if row is None:
            raise MessageNotFound(message_id)
        return MessageInfo(*row)

    def dead_letters(self, limit: int | None = None) -> list[MessageInfo]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        with self._connection() as connection:
            self._bury(connection)
            rows = connection.execute(query("dead_letters"), {"limit": limit}).fetchall()
        return [MessageInfo(*row) for row in rows]

    def redrive(self, message_id: str) -> None:
        if self._redrive(message_id) == 0:
            raise MessageNotFound(message_id)

    def redrive_all(self) -> int:
        return self._redrive(None)

    def _redrive(self, message_id: str | None) -> int:
        with self._connection() as connection:
            self._bury(connection)
            row = connection.execute(query("redrive"), {"message_id": message_id}).fetchone()
        assert row is not None
        count = int(row[0])
        if count:
            self._add(redriven=count)
            self._wakeups.bump()
        return count

    def create_key(self, name: str, scopes: Sequence[str]) -> NewApiKey:
        return self._api_keys.create(name, scopes)

    def list_keys(self) -> list[ApiKey]:
        return self._api_keys.all()

    def revoke_key(self, key_id: str) -> None:
        self._api_keys.revoke(key_id)

    # -- housekeeping ------------------------------------------------------------------

    def sweep(self) -> None:
        """Delete a batch of expired idempotency keys, at most every ``SWEEP_SECONDS``."""
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_SECONDS:
            return
        self._last_sweep = now
        with self._connection() as connection:
            # Planned afresh each time (not prepared): a plan cached while the
            # table was small would scan it whole once it has grown.
            forgotten = connection.execute(query("forget_expired_keys"), prepare=False).rowcount
        if forgotten:
            log.info("forgot %d expired idempotency keys", forgotten)

    # -- internals ---------------------------------------------------------------------

    def _notify(self) -> None:
        with self._pool.connection(timeout=1.0) as connection:
            connection.execute(query("notify"))

    def _connection(
        self, passing: tuple[type[BaseException], ...] = ()
    ) -> contextlib.AbstractContextManager[Connection]:
        """A pooled connection in autocommit; database errors raised as the broker's own."""
        return lend(self._pool, passing)

    def _add(self, **counts: int) -> None:
        """Add to this broker's totals (``BrokerStats``' counters)."""
        with self._totals_lock:
            self._totals.update(counts)

    def _bury(self, connection: Connection) -> None:
        row = connection.execute(
            query("bury_expired"), {"max_deliveries": self._max_deliveries}
        ).fetchone()
        buried = int(row[0]) if row else 0
        if buried:
            log.warning("dead-lettered %d messages whose last lease ran out", buried)
            self._add(dead_lettered=buried)

    @staticmethod
    def _receipt(receipt: str) -> tuple[str, str]:
        parts = convert.parse_receipt(receipt)
        if parts is None:
            raise StaleReceipt(receipt)
        return parts


_RACES: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

_TOTALS: Final = tuple(f.name for f in fields(BrokerStats) if f.metadata["kind"] == "counter")
