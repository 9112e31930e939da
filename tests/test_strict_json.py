"""broker.strict_json: what the body reader accepts, what it refuses as a whole, and how."""

from __future__ import annotations

from decimal import Decimal

import pytest

from broker.errors import InvalidFormula
from broker.strict_json import MAX_BODY_BYTES, MAX_DEPTH, parse_json, repeated_keys


def formula_with(concentration: str) -> bytes:
    """A formula body with one material, "Rose", its concentration raw JSON as given."""
    return b'{"name":"Test","materials":[{"name":"Rose","concentration":%s}]}' % (
        concentration.encode()
    )


# --- refused as a whole -------------------------------------------------------

REFUSED = [
    pytest.param(b"", id="empty body"),
    pytest.param(b" \r\n\t", id="whitespace-only body"),
    pytest.param(b'{"name": "Test", "materials": [', id="truncated JSON"),
    pytest.param(b"{'name': 'Test'}", id="single quotes"),
    pytest.param(b"\xef\xbb\xbf" + formula_with("10"), id="a UTF-8 byte order mark"),
    pytest.param(formula_with("10") + b" " * (MAX_BODY_BYTES), id="over 65536 bytes"),
    pytest.param(b'{"name":"T\xff","materials":[]}', id="invalid UTF-8"),
    pytest.param(b'{"name":"\xc0\xaf","materials":[]}', id="overlong UTF-8"),
    pytest.param(b'{"name":"\xed\xa0\x80","materials":[]}', id="UTF-8 surrogate"),
    pytest.param(b'{"name":"\xe2\x82', id="truncated UTF-8"),
    pytest.param(b"[" * 60000, id="60000 nested arrays"),
    pytest.param(b"[" * 100000 + b"]" * 100000, id="100000 nested arrays"),
    pytest.param(b'{"a":' * 40 + b"1" + b"}" * 40, id="40 nested objects"),
    pytest.param(
        formula_with("[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)),
        id="33 levels inside a material",
    ),
    # numbers JSON does not have
    pytest.param(formula_with("NaN"), id="NaN"),
    pytest.param(formula_with("Infinity"), id="Infinity"),
    pytest.param(formula_with("-Infinity"), id="-Infinity"),
    pytest.param(formula_with("1e99999999999999999999"), id="exponent too big"),
    pytest.param(formula_with("010"), id="a leading zero"),
    pytest.param(formula_with("+10"), id="a plus sign"),
]


@pytest.mark.parametrize("raw", REFUSED)
def test_a_body_that_is_not_acceptable_json_gets_one_body_error(raw: bytes) -> None:
    with pytest.raises(InvalidFormula) as caught:
        parse_json(raw)
    assert [error.field for error in caught.value.errors] == ["body"]


def test_a_deeply_nested_body_is_refused_without_recursing() -> None:
    for raw in (b"[" * MAX_BODY_BYTES, b"{" * MAX_BODY_BYTES, b'{"a":' * 13000):
        with pytest.raises(InvalidFormula) as caught:
            parse_json(raw)
        assert caught.value.errors[0].message == "is nested more than 32 levels deep"


def test_nesting_up_to_max_depth_parses_and_one_more_level_does_not() -> None:
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    with pytest.raises(InvalidFormula):
        parse_json(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))


def test_escaped_quotes_do_not_hide_nesting_from_the_depth_scan() -> None:
    raw = b'["\\"", ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"]"
    with pytest.raises(InvalidFormula):
        parse_json(raw)


def test_many_unterminated_looking_strings_are_refused() -> None:
    for raw in (b'"\\"' * 21000, b'["' + b'\\"' * 32000):
        with pytest.raises(InvalidFormula):
            parse_json(raw)


# --- the values it gives ------------------------------------------------------


def test_every_json_number_is_parsed_as_an_exact_decimal() -> None:
    document = parse_json(b"[15.5, 10, 1e1, 0.1, 12345678901234567890.123456789012345678]")
    assert document == [
        Decimal("15.5"),
        Decimal(10),
        Decimal(10),
        Decimal("0.1"),
        Decimal("12345678901234567890.123456789012345678"),
    ]
    assert isinstance(document, list)
    assert all(type(number) is Decimal for number in document)


def test_an_integer_beyond_pythons_digit_limit_parses_without_error() -> None:
    document = parse_json(b"[" + b"7" * 5000 + b"]")
    assert document == [Decimal("7" * 5000)]


def test_booleans_and_null_stay_what_they_are() -> None:
    assert parse_json(b"[true, false, null]") == [True, False, None]


def test_a_repeated_key_keeps_the_last_value_until_validation_reports_it() -> None:
    assert parse_json(b'{"a": 1, "a": 2}') == {"a": Decimal(2)}


def test_repeated_keys_names_each_repeated_key_of_that_object_once_in_order() -> None:
    document = parse_json(b'[{"b":1,"a":1,"b":2,"a":3,"b":4,"c":5}, {"a":1}]')
    assert isinstance(document, list)
    assert repeated_keys(document[0]) == ("b", "a")
    assert repeated_keys(document[1]) == ()
    assert repeated_keys(document) == ()
    assert repeated_keys({"a": 1}) == ()
