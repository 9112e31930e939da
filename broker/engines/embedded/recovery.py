"""Rebuilding the embedded engine's memory from its journal, when the broker starts.

Formulas go back into the store in submit order, every unacknowledged
message into the queue (visible again, its delivery count kept), keys and
API keys into theirs. Cost: O(n) in what the journal holds, with the cyclic
garbage collector paused: millions of new objects, none of them garbage,
would otherwise set off full collections for nothing.
"""

from __future__ import annotations

import gc
import logging

from broker.engines.embedded.apikeys import ApiKeys
from broker.engines.embedded.changes import BuryMessage, Change, Recovered
from broker.engines.embedded.idempotency import IdempotencyKeys
from broker.engines.embedded.journal import Journal
from broker.engines.embedded.queue import MessageQueue
from broker.engines.embedded.store import FormulaStore

__all__ = ["recover"]

log = logging.getLogger(__name__)


def recover(
    journal: Journal,
    store: FormulaStore,
    queue: MessageQueue,
    keys: IdempotencyKeys,
    api_keys: ApiKeys,
) -> None:
    """Fill the (empty) engine parts with everything ``journal`` holds."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        recovered = journal.load()
        buried = _rebuild(recovered, store, queue, keys, api_keys)
    finally:
        if collecting:
            gc.enable()
    if buried:
        journal.write(buried)
    if recovered.formulas or recovered.messages or recovered.api_keys:
        log.info(
            "recovered %d formulas, %d unacknowledged messages, %d idempotency keys, %d API keys",
            len(recovered.formulas),
            len(recovered.messages),
            len(recovered.keys),
            len(recovered.api_keys),
        )


def _rebuild(
    recovered: Recovered,
    store: FormulaStore,
    queue: MessageQueue,
    keys: IdempotencyKeys,
    api_keys: ApiKeys,
) -> list[Change]:
    """Returns the messages buried on the way, for the journal."""
    store.restore(recovered.formulas)
    buried: list[Change] = []
    for message in recovered.messages:
        # A message that used its last delivery before the crash is dead:
        # its lease would have run out into the dead letters.
        dead = message.dead or message.deliveries >= queue.max_deliveries
        if dead and not message.dead:
            buried.append(BuryMessage(message.message_id))
        queue.restore(
            message.message_id,
            message.formula_id,
            message.fingerprint,
            message.deliveries,
            dead,
        )
    for remembered in recovered.keys:
        keys.restore(remembered)
    for api_key in recovered.api_keys:
        api_keys.put(api_key)
    return buried
