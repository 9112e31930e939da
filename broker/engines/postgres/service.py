"""The PostgreSQL engine's face: every rule about state, kept in one database many brokers share.

``PostgresBroker`` implements ``broker.interface.Broker``. It holds no state
another broker would need: formulas, keys and messages live in the database,
each atomic step is one transaction (its logic in the SQL functions of
``sql/migrations``), and leases and delays run on the database's clock, so
brokers on many hosts serve one system whatever their own clocks say.

What this process keeps for itself: a small connection pool, the listening
connection that wakes long polls (``wakeups``), the counters of
``BrokerStats`` (totals of what *this* broker did since it started; the
gauges are the whole system's), and the token buckets of
``FORMULARY_RATE_LIMIT``: each broker limits the calls that reach it, so
across hosts a key may make up to the limit on each host.

API keys live in the database like the rest; ``authenticate`` reads the key
on every call, so a revocation made through any host's admin socket holds
on every host from its commit on.

Each call is one statement on a pooled connection in autocommit, so one
round trip: the atomic steps are SQL functions, each one transaction.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import psycopg
import simplejson
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.apikeys import digest, matches, new_key_id, new_secret, parse_name, parse_scopes
from broker.engines.postgres.sql import query
from broker.engines.postgres.wakeups import Wakeups
from broker.engines.shared import (
    TokenBuckets,
    decode_cursor,
    encode_cursor,
    new_id,
    pack_summary,
)
from broker.errors import (
    ApiKeyNotFound,
    BrokerUnavailable,
    DuplicateFormula,
    FormulaNotFound,
    IdempotencyKeyReused,
    InvalidSummary,
    MessageNotFound,
    QueueFull,
    StaleReceipt,
    StorageFailed,
)
from broker.formula import FormulaDraft, Material
from broker.interface import (
    ALREADY_ACKED,
    COMPLETED,
    INVALID_SUMMARY,
    MAX_PAGE,
    QUEUED,
    STALE,
    ApiKey,
    BrokerStats,
    Delivery,
    FormulaPage,
    FormulaView,
    IdempotencyKey,
    MessageInfo,
    NewApiKey,
    Submission,
    SubmitOutcome,
    SubmitRequest,
    rfc3339,
    unwrap,
)

log = logging.getLogger(__name__)

MAX_BATCH: Final = 100
MAX_WAIT_SECONDS: Final = 60.0
SWEEP_SECONDS: Final = 60.0
"""How often this broker deletes a batch of expired idempotency keys."""
_RECEIPT_SEPARATOR: Final = "."
_NO_CURSOR: Final = 2**63 - 1


class PostgresBroker:
    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]],
        wakeups: Wakeups,
        *,
        queue_capacity: int = 100_000,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 5,
        idempotency_ttl: float = 24 * 3600.0,
        rate_limit: float | None = None,
        new_id: Callable[[], str] = new_id,
    ) -> None:
        self._pool = pool
        self._wakeups = wakeups
        self._capacity = queue_capacity
        self._visibility_timeout = visibility_timeout
        self._max_deliveries = max_deliveries
        self._idempotency_ttl = idempotency_ttl
        self._new_id = new_id
        self._totals: Counter[str] = Counter()
        self._totals_lock = threading.Lock()
        self._last_sweep = 0.0
        self._buckets = None if rate_limit is None else TokenBuckets(rate_limit)

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
        if not _is_text(key_id) or not _is_text(secret_digest) or not secret_digest.isascii():
            return None
        with self._connection() as connection:
            row = connection.execute(query("api_key"), {"key_id": key_id}).fetchone()
        if row is None or row[5] is not None or not matches(row[3], secret_digest):
            return None
        return _api_key(row)

    def rate_limit(self, key_id: str) -> float:
        return 0.0 if self._buckets is None else self._buckets.spend(key_id)

    def submit(self, draft: FormulaDraft, idempotency: IdempotencyKey | None = None) -> Submission:
        [outcome] = self.submit_many([(draft, idempotency)])
        return unwrap(outcome)

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        """Every submit of the group in one statement: one transaction, one WAL flush.

        ``formulary.submit_many`` runs ``formulary.submit`` for each, in order,
        each seeing the ones before it; if the transaction fails as a whole (a
        deadlock between two groups racing on the same make-ups, say), each is
        run again alone.
        """
        if not requests:
            return []
        try:
            return self._submit_group(requests)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            if len(requests) == 1:
                raise StorageFailed("the submit lost a race twice; retry") from None
            log.info("a group of %d submits met a deadlock; submitting each alone", len(requests))
        outcomes: list[SubmitOutcome] = []
        for request in requests:
            try:
                outcomes.extend(self._submit_group([request]))
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                outcomes.append(StorageFailed("the submit lost a race; retry"))
        return outcomes

    def _submit_group(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        keys = [idempotency for _, idempotency in requests]
        with self._connection(passing=_RACES) as connection:
            rows = connection.execute(
                query("submit_many"),
                {
                    "owners": ["" if k is None else k.owner for k in keys],
                    "keys": [None if k is None else k.key for k in keys],
                    "body_digests": [None if k is None else k.body_digest for k in keys],
                    "key_ttl": self._idempotency_ttl,
                    "formula_ids": [self._new_id() for _ in requests],
                    "names": [draft.name for draft, _ in requests],
                    "materials": [pack_materials(draft.materials) for draft, _ in requests],
                    "fingerprints": [draft.fingerprint for draft, _ in requests],
                    "message_ids": [self._new_id() for _ in requests],
                    "capacity": self._capacity,
                },
            ).fetchall()
        outcomes = [
            self._answer(row[1:], request) for row, request in zip(rows, requests, strict=True)
        ]
        self._count(outcomes)
        return outcomes

    def _answer(self, row: Any, request: SubmitRequest) -> SubmitOutcome:
        outcome, formula_id, name, materials, fingerprint, message_id, created_at = row
        draft, idempotency = request
        if outcome == "key_reused":
            assert idempotency is not None
            return IdempotencyKeyReused(idempotency.key)
        if outcome == "full":
            return QueueFull(self._capacity)
        if outcome in ("duplicate", "duplicate_replayed"):
            return DuplicateFormula(formula_id, fingerprint, outcome == "duplicate_replayed")
        # The answer as given when the formula was stored: queued, undelivered.
        return Submission(
            FormulaView(
                id=formula_id,
                name=name,
                materials=draft.materials if outcome == "accepted" else unpack_materials(materials),
                fingerprint=fingerprint,
                message_id=message_id,
                created_at=rfc3339(created_at),
                status=QUEUED,
                deliveries=0,
                processed_at=None,
                summary=None,
            ),
            replayed=outcome == "replayed",
        )

    def _count(self, outcomes: Sequence[SubmitOutcome]) -> None:
        with self._totals_lock:
            for outcome in outcomes:
                if isinstance(outcome, Submission) and not outcome.replayed:
                    self._totals["submitted"] += 1
                    self._totals["published"] += 1
                elif isinstance(outcome, DuplicateFormula) and not outcome.replayed:
                    self._totals["duplicates"] += 1
                elif isinstance(outcome, QueueFull):
                    self._totals["refused_capacity"] += 1

    def get_formula(self, formula_id: str) -> FormulaView:
        [found] = self.get_formulas([formula_id])
        if found is None:
            raise FormulaNotFound(formula_id)
        return found

    def get_formulas(self, formula_ids: Sequence[str]) -> list[FormulaView | None]:
        with self._connection() as connection:
            rows = connection.execute(
                query("formulas_by_id"),
                {"ids": list(formula_ids), "max_deliveries": self._max_deliveries},
            ).fetchall()
        views = {row[0]: _view(row) for row in rows}
        return [views.get(formula_id) for formula_id in formula_ids]

    def list_formulas(self, limit: int, cursor: str | None = None) -> FormulaPage:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        before = _NO_CURSOR if cursor is None else decode_cursor(cursor)
        with self._connection() as connection:
            rows = connection.execute(
                query("formula_page"),
                {"before": before, "limit": limit + 1, "max_deliveries": self._max_deliveries},
            ).fetchall()
        items = tuple(_view(row) for row in rows[:limit])
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

    def receive(
        self,
        consumer: str,
        max_messages: int = 1,
        visibility_timeout: float | None = None,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        max_messages = max(1, min(int(max_messages), MAX_BATCH))
        wait_seconds = max(0.0, min(float(wait_seconds), MAX_WAIT_SECONDS))
        lease = self._visibility_timeout if visibility_timeout is None else visibility_timeout
        if not (math.isfinite(lease) and lease > 0):
            raise ValueError(
                f"visibility_timeout must be a positive number of seconds, not {lease}"
            )
        deadline = time.monotonic() + wait_seconds
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
        deliveries = [
            Delivery(
                message_id=message_id,
                formula_id=formula_id,
                fingerprint=fingerprint,
                receipt=f"{message_id}{_RECEIPT_SEPARATOR}{token}",
                delivery=count,
                lease_expires_at=expires_at,
            )
            for message_id, formula_id, fingerprint, token, count, expires_at, *_ in rows
        ]
        if deliveries:
            with self._totals_lock:
                self._totals["delivered"] += len(deliveries)
                self._totals["redelivered"] += sum(d.delivery > 1 for d in deliveries)
        return deliveries, due_in

    def complete(self, receipt: str, summary: Mapping[str, Any]) -> bool:
        [outcome] = self.complete_many([(receipt, summary)])
        if outcome == STALE:
            raise StaleReceipt(receipt)
        if outcome == INVALID_SUMMARY:
            raise InvalidSummary("JSON cannot hold this summary")
        return outcome == COMPLETED

    def complete_many(self, results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Every result and ack in one statement; each receipt checked under its row lock."""
        outcomes: list[str] = []
        asked: list[tuple[int, str, str, str]] = []  # (position, message id, token, summary)
        for position, (receipt, summary) in enumerate(results):
            parts = _parse_receipt(receipt)
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
            outcomes[position] = _COMPLETE_OUTCOMES[answer]
        with self._totals_lock:
            self._totals["processed"] += answers.count("recorded")
            self._totals["acked"] += answers.count("recorded") + answers.count("acked")
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
        with self._totals_lock:
            self._totals["acked"] += 1
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
        with self._totals_lock:
            self._totals["nacked"] += 1
            if row[0] == "dead":
                self._totals["dead_lettered"] += 1
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
            with self._totals_lock:
                self._totals["redriven"] += count
            self._wakeups.bump()
        return count

    def create_key(self, name: str, scopes: Sequence[str]) -> NewApiKey:
        name, chosen = parse_name(name), parse_scopes(scopes)
        row = None
        with self._connection() as connection:
            while row is None:  # an id already taken gives no row: draw another
                key_id = new_key_id()
                secret = new_secret(key_id)
                row = connection.execute(
                    query("create_api_key"),
                    {
                        "key_id": key_id,
                        "name": name,
                        "scopes": list(chosen),
                        "secret_digest": digest(secret),
                    },
                ).fetchone()
        log.info("made API key %s (%r) with scopes %s", key_id, name, ",".join(chosen))
        key = ApiKey(key_id, name, chosen, rfc3339(row[0]), None)
        return NewApiKey(key, secret)

    def list_keys(self) -> list[ApiKey]:
        with self._connection() as connection:
            rows = connection.execute(query("api_keys")).fetchall()
        return [_api_key(row) for row in rows]

    def revoke_key(self, key_id: str) -> None:
        if not _is_text(key_id):
            raise ApiKeyNotFound(key_id)
        with self._connection() as connection:
            row = connection.execute(query("revoke_api_key"), {"key_id": key_id}).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        log.info("revoked API key %s", key_id)

    # -- housekeeping ------------------------------------------------------------------

    def sweep(self) -> None:
        """Delete a batch of expired idempotency keys, at most every ``SWEEP_SECONDS``."""
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_SECONDS:
            return
        self._last_sweep = now
        with self._connection() as connection:
            forgotten = connection.execute(query("forget_expired_keys")).rowcount
        if forgotten:
            log.info("forgot %d expired idempotency keys", forgotten)

    # -- internals ---------------------------------------------------------------------

    def _notify(self) -> None:
        with self._pool.connection(timeout=1.0) as connection:
            connection.execute(query("notify"))

    @contextlib.contextmanager
    def _connection(
        self, passing: tuple[type[BaseException], ...] = ()
    ) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A pooled connection in autocommit: each statement is its own transaction.

        Every atomic step is one statement (a function in ``sql/migrations``),
        so none needs BEGIN and COMMIT round trips. Database errors become the
        broker's own (see the module docstring); ``passing`` names the ones the
        caller handles itself.
        """
        try:
            with self._pool.connection() as connection:
                yield connection
        except passing:
            raise
        except PoolTimeout as exc:
            raise BrokerUnavailable(f"no database connection: {exc}") from None
        except psycopg.OperationalError as exc:
            raise BrokerUnavailable(f"the database cannot be reached: {exc}") from None
        except psycopg.Error as exc:
            log.error("database error: %r", exc)
            raise StorageFailed(f"{type(exc).__name__}: {exc}") from None

    def _bury(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        row = connection.execute(
            query("bury_expired"), {"max_deliveries": self._max_deliveries}
        ).fetchone()
        buried = int(row[0]) if row else 0
        if buried:
            log.warning("dead-lettered %d messages whose last lease ran out", buried)
            with self._totals_lock:
                self._totals["dead_lettered"] += buried

    @staticmethod
    def _receipt(receipt: str) -> tuple[str, str]:
        parts = _parse_receipt(receipt)
        if parts is None:
            raise StaleReceipt(receipt)
        return parts


_RACES: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

_TOTALS: Final = (
    "submitted",
    "duplicates",
    "refused_capacity",
    "published",
    "delivered",
    "redelivered",
    "acked",
    "nacked",
    "dead_lettered",
    "redriven",
    "processed",
)

_COMPLETE_OUTCOMES: Final = {
    "recorded": COMPLETED,
    "acked": COMPLETED,
    "gone": ALREADY_ACKED,
    "stale": STALE,
}


def _parse_receipt(receipt: object) -> tuple[str, str] | None:
    # A receipt crosses the manager from a client: it may be anything.
    if not isinstance(receipt, str):
        return None
    message_id, separator, token = receipt.rpartition(_RECEIPT_SEPARATOR)
    if not separator or not message_id or not token:
        return None
    return message_id, token


def _is_text(value: object) -> bool:
    # Ids and digests cross the manager from a client; PostgreSQL text holds no NUL.
    return isinstance(value, str) and "\0" not in value


def _api_key(row: Sequence[Any]) -> ApiKey:
    key_id, name, scopes, _, created_at, revoked_at = row
    return ApiKey(
        id=key_id,
        name=name,
        scopes=tuple(scopes),
        created_at=rfc3339(created_at),
        revoked_at=None if revoked_at is None else rfc3339(revoked_at),
    )


def pack_materials(materials: Sequence[Material]) -> str:
    """Materials as JSON text for the jsonb column, numbers with their exact digits."""
    text: str = _MATERIALS_ENCODER.encode(
        [{"name": m.name, "concentration": m.concentration} for m in materials]
    )
    return text


_MATERIALS_ENCODER: Final = simplejson.JSONEncoder(use_decimal=True, separators=(",", ":"))


def unpack_materials(data: Sequence[Mapping[str, Any]]) -> tuple[Material, ...]:
    # Whole numbers come back as int, the rest as Decimal (the loader's parse_float).
    return tuple(Material(m["name"], Decimal(m["concentration"])) for m in data)


def _view(row: Sequence[Any]) -> FormulaView:
    (
        formula_id,
        name,
        materials,
        fingerprint,
        message_id,
        created_at,
        status,
        deliveries,
        processed_at,
        summary,
    ) = row[:10]
    return FormulaView(
        id=formula_id,
        name=name,
        materials=unpack_materials(materials),
        fingerprint=fingerprint,
        message_id=message_id,
        created_at=rfc3339(created_at),
        status=status,
        deliveries=deliveries,
        processed_at=None if processed_at is None else rfc3339(processed_at),
        summary=summary,
    )
