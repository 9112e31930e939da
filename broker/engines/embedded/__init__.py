"""The embedded engine: every piece of state in this process's memory, journalled to SQLite.

One broker process per deployment. ``service`` is the engine's face (one lock
around everything); the submit path is in ``admission``; the state lives in
``store`` (formulas and the dedupe index), ``queue`` (leases, redelivery,
dead letters), ``idempotency`` (remembered answers) and ``apikeys`` (who may
call); ``journal`` writes each atomic step's ``changes`` to an SQLite file
(its schema and statements in ``journal_sql``) and gives them back on start,
where ``recovery`` rebuilds the state from them.
"""

from __future__ import annotations

from broker.engines.embedded.journal import open_journal
from broker.engines.embedded.service import EmbeddedBroker
from broker.settings import Settings

__all__ = ["EmbeddedBroker", "open_embedded"]


def open_embedded(settings: Settings) -> EmbeddedBroker:
    """The engine on ``settings.data`` (a journal path or ``:memory:``), state recovered."""
    return EmbeddedBroker(
        queue_capacity=settings.queue_capacity,
        visibility_timeout=settings.visibility_timeout,
        max_deliveries=settings.max_deliveries,
        idempotency_ttl=settings.idempotency_ttl,
        rate_limit=settings.rate_limit,
        journal=open_journal(settings.data),
    )
