"""Group commit: concurrent callers share one pass through a batch function.

A round trip to the broker costs about the same for one submit as for
several, and so does the journal commit behind it (its fsync dominates).
``broker.client`` puts a process's submits through a :class:`GroupCommit`:
the submits its threads make while one ``submit_many`` is under way go
together in the next, and the engine commits each ``submit_many`` as one
transaction.

It is flat combining. Each caller adds its items to a waiting list. If no
group is being applied, that caller leads: it takes the whole list and runs
``apply`` on it once. Then it wakes the callers of that group and hands the
lead to the first caller that arrived meanwhile, who takes everything waiting
by then. Each caller sleeps on a lock of its own, so no caller wakes only to
sleep again.

A caller handed the lead yields once (``time.sleep(0)``) before it takes the
list. In the API's gevent worker that lets the greenlets already runnable go
first (gevent's ``sleep(0)`` does not wait for the loop to poll again): the
ones whose requests the loop found ready in the same turn as the last
group's answer then join this group instead of the next. Without it, over
half of the groups at 8 connections held a single submit; with it, most hold
two or three, and each round trip and commit is shared more
(bench/README.md). Between threads it only gives up the GIL for a moment.

Every caller gets back exactly its own outcome (a value, or an exception
raised in its thread; :meth:`GroupCommit.outcomes` takes several items at
once and returns theirs), and only after the group that held its items has
been applied in full, so an answer never precedes the commit that makes it
true.

``apply`` takes items in arrival order and returns one outcome per item: the
value to return or the exception to raise. If it raises, every item of the
group gets that exception. Costs: O(1) per call besides ``apply``, and one
lock per caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiter(Generic[Item, Result]):
    """One caller's items, their outcomes once known, and the lock it sleeps on."""

    __slots__ = ("items", "outcomes", "wake")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.outcomes: list[Result | BaseException] | None = None
        # Held from the start: the caller blocks acquiring it until a leader
        # releases it, either with its outcomes or to make it the next leader.
        self.wake = threading.Lock()
        self.wake.acquire()


class GroupCommit(Generic[Item, Result]):
    def __init__(self, apply: Callable[[Sequence[Item]], Sequence[Result | BaseException]]) -> None:
        self._apply = apply
        self._lock = threading.Lock()
        self._waiting: list[_Waiter[Item, Result]] = []
        self._applying = False

    @property
    def waiting(self) -> int:
        """Callers whose items wait for the next group (not the one being applied)."""
        with self._lock:
            return len(self._waiting)

    def __call__(self, item: Item) -> Result:
        """``item``'s outcome: its value returned, or its exception raised."""
        [outcome] = self.outcomes([item])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def outcomes(self, items: Sequence[Item]) -> list[Result | BaseException]:
        """Every item's outcome, in order; the items join one group together."""
        if not items:
            return []
        me: _Waiter[Item, Result] = _Waiter(list(items))
        with self._lock:
            self._waiting.append(me)
            leading = not self._applying
            self._applying = True
        if not leading:
            me.wake.acquire()
            if me.outcomes is not None:
                return me.outcomes
            # Woken without outcomes: the last leader handed the lead to us.
            # Let the callers that are ready to join do so first (see above).
            time.sleep(0)
        with self._lock:
            group, self._waiting = self._waiting, []
        self._lead(group)
        assert me.outcomes is not None
        return me.outcomes

    def _lead(self, group: list[_Waiter[Item, Result]]) -> None:
        items = [item for waiter in group for item in waiter.items]
        try:
            outcomes = list(self._apply(items))
            if len(outcomes) != len(items):
                raise RuntimeError(f"{len(outcomes)} outcomes for a group of {len(items)}")
        except BaseException as exc:
            outcomes = [exc] * len(items)
        start = 0
        for waiter in group:
            waiter.outcomes = outcomes[start : start + len(waiter.items)]
            start += len(waiter.items)
        with self._lock:
            # The first caller that arrived meanwhile leads next; the others
            # sleep on, so only the callers with an answer or a lead wake.
            successor = self._waiting[0] if self._waiting else None
            self._applying = successor is not None
        if successor is not None:
            successor.wake.release()
        for waiter in group:
            waiter.wake.release()
