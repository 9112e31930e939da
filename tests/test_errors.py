"""Domain errors cross the manager connection by pickling: each must round-trip."""

from __future__ import annotations

import pickle

import pytest

from broker import errors
from broker.errors import FieldError

EXAMPLES = [
    errors.InvalidFormula((FieldError("name", "is required"),)),
    errors.DuplicateFormula("abc", "f" * 64),
    errors.DuplicateFormula("abc", "f" * 64, True),
    errors.IdempotencyKeyReused("key-1"),
    errors.QueueFull(10),
    errors.FormulaNotFound("nope"),
    errors.InvalidCursor("zzz"),
    errors.InvalidSummary("NaN is not JSON"),
    errors.StaleReceipt("m.r"),
    errors.MessageNotFound("m"),
    errors.ApiKeyNotFound("k1"),
    errors.StorageFailed("disk full"),
    errors.BrokerUnavailable("refused"),
]


def test_every_domain_error_has_an_example() -> None:
    classes = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.FormularyError)
    } - {errors.FormularyError}
    assert classes == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_errors_survive_a_pickle_round_trip_with_their_fields(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.args == error.args
    for name in dir(type(error)):
        if isinstance(getattr(type(error), name, None), property):
            assert getattr(copy, name) == getattr(error, name)
