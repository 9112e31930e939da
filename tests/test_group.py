"""Group commit: callers that arrive while a group is applied share the next one."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from broker.group import GroupCommit
from tests.support import wait_for


class Recorder:
    """An ``apply`` that doubles numbers, fails on negatives, and can hold its first group."""

    def __init__(self, hold_first: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.groups.append(list(items))
        self.entered.set()
        self.release.wait(timeout=15)
        return [ValueError(n) if n < 0 else 2 * n for n in items]


def run_in_threads(group: GroupCommit[int, int], items: list[int]) -> dict[int, object]:
    results: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, _outcome(group, n)))
        for n in items
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    return results


def test_a_lone_caller_gets_its_own_outcome() -> None:
    group: GroupCommit[int, int] = GroupCommit(Recorder())
    assert group(21) == 42
    with pytest.raises(ValueError):
        group(-1)


def test_callers_arriving_while_a_group_is_applied_share_the_next_group() -> None:
    apply = Recorder(hold_first=True)
    group: GroupCommit[int, int] = GroupCommit(apply)
    first = threading.Thread(target=group, args=(1,))
    first.start()
    assert apply.entered.wait(timeout=15)

    results: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, _outcome(group, n)))
        for n in (2, -3, 4)
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: group.waiting == 3, what="three callers waiting behind the first group")
    apply.release.set()
    first.join(timeout=15)
    for thread in threads:
        thread.join(timeout=15)

    assert apply.groups[0] == [1]
    assert sorted(apply.groups[1]) == [-3, 2, 4] and len(apply.groups) == 2
    # Each caller got its own outcome; the failure stayed with its own caller.
    assert results[2] == 4 and results[4] == 8
    assert isinstance(results[-3], ValueError)


def test_when_apply_raises_every_caller_of_the_group_gets_the_error() -> None:
    def broken(items: Sequence[int]) -> list[int | BaseException]:
        raise RuntimeError("journal on fire")

    group: GroupCommit[int, int] = GroupCommit(broken)
    results = run_in_threads(group, [1, 2, 3])
    assert len(results) == 3
    assert all(isinstance(outcome, RuntimeError) for outcome in results.values())
    # The next caller leads a group of its own: nothing is stuck.
    with pytest.raises(RuntimeError):
        group(4)


def test_an_apply_that_answers_the_wrong_number_of_outcomes_is_an_error() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 outcomes for a group of 1"):
        group(1)


def _outcome(group: GroupCommit[int, int], n: int) -> object:
    try:
        return group(n)
    except BaseException as exc:
        return exc


def test_many_callers_each_get_their_own_outcomes_and_none_is_left_waiting() -> None:
    applied: list[int] = []

    def apply(items: Sequence[int]) -> list[int | BaseException]:
        applied.extend(items)
        return [2 * n for n in items]

    group: GroupCommit[int, int] = GroupCommit(apply)
    wrong: list[tuple[int, object]] = []

    def caller(base: int) -> None:
        for n in range(base, base + 300, 3):
            got: object = group(n) if n % 2 else group.outcomes([n, n + 1, n + 2])
            want: object = 2 * n if n % 2 else [2 * n, 2 * n + 2, 2 * n + 4]
            if got != want:
                wrong.append((n, got))

    threads = [threading.Thread(target=caller, args=(1000 * t,)) for t in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []
    assert group.waiting == 0
    # Every item was applied exactly once.
    assert len(applied) == len(set(applied))
