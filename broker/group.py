"""Group commit: concurrent callers share one pass through a batch function.

A durable submit costs one journal commit, and a commit costs the same for
one formula as for ten (its fsync dominates). :class:`GroupCommit` lets the
submits that arrive while a commit is under way wait for the next one and
share it, instead of queueing one by one on the broker lock.

It is flat combining. Each caller adds its item to a waiting list. If no group
is being applied, that caller becomes the leader: it takes the whole list and
runs ``apply`` on it once, then wakes everyone. The others sleep until their
item has its outcome, or until the leader is done and one of them must lead
the items that arrived meanwhile. Every caller gets back exactly its own
outcome (a value, or an exception raised in its thread), and only after the
group that held its item has been applied in full, so an answer never
precedes the commit that makes it true.

``apply`` takes items in arrival order and returns one outcome per item: the
value to return or the exception to raise. If it raises, every item of the
group gets that exception. Costs: O(1) per call besides ``apply``; one
``notify_all`` per group, which wakes the callers that wait (at most one per
connection to the broker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Call(Generic[Item, Result]):
    __slots__ = ("done", "item", "outcome")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.outcome: Result | BaseException | None = None
        self.done = False


class GroupCommit(Generic[Item, Result]):
    def __init__(self, apply: Callable[[Sequence[Item]], Sequence[Result | BaseException]]) -> None:
        self._apply = apply
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[_Call[Item, Result]] = []
        self._applying = False

    @property
    def waiting(self) -> int:
        """Callers whose item waits for the next group (not the one being applied)."""
        with self._changed:
            return len(self._waiting)

    def __call__(self, item: Item) -> Result:
        call: _Call[Item, Result] = _Call(item)
        with self._changed:
            self._waiting.append(call)
            while self._applying and not call.done:
                self._changed.wait()
            group: list[_Call[Item, Result]] = []
            if not call.done:
                group, self._waiting = self._waiting, []
                self._applying = True
        if group:
            self._lead(group)
        if isinstance(call.outcome, BaseException):
            raise call.outcome
        return call.outcome  # type: ignore[return-value]

    def _lead(self, group: list[_Call[Item, Result]]) -> None:
        try:
            outcomes = self._apply([call.item for call in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"{len(outcomes)} outcomes for a group of {len(group)}")
        except BaseException as exc:
            outcomes = [exc] * len(group)
        finally:
            with self._changed:
                for call, outcome in zip(group, outcomes, strict=True):
                    call.outcome = outcome
                    call.done = True
                self._applying = False
                self._changed.notify_all()
