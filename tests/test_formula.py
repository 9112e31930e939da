"""broker.formula: every rule of SPEC "Data", the identity key and the fingerprint."""

from __future__ import annotations

import hashlib
import json
import pickle
import string
import unicodedata
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidFormula
from broker.formula import (
    MAX_MATERIALS,
    MAX_NAME_LENGTH,
    FormulaDraft,
    Material,
    canonical_decimal,
    canonical_json,
    decimal_text,
    fingerprint,
    material_key,
    parse_formula,
    validate_formula,
)
from broker.strict_json import MAX_BODY_BYTES, parse_json

SPEC_EXAMPLE = b"""{"name": "Summer Breeze",
 "materials": [{"name": "Bergamot Oil", "concentration": 15.5},
               {"name": "Lavender Absolute", "concentration": 10.0},
               {"name": "Sandalwood", "concentration": 5.2}]}"""

# Computed once from SPEC_EXAMPLE. If this test fails, stored fingerprints no
# longer match new submissions: change the encoding's version tag and migrate
# instead of updating this value.
SPEC_EXAMPLE_FINGERPRINT = "d26ecf0fd04f3498c892e3817e3ee9e454edd5bac0e187bdbcb288d236e2c984"

modest = settings(max_examples=200, deadline=None)


def mat(name: str = "Rose", concentration: str = "10") -> str:
    """One material's JSON text; the concentration is raw JSON, spelt as given."""
    return f'{{"name":{json.dumps(name)},"concentration":{concentration}}}'


def body(*materials: str, name: str = "Test") -> bytes:
    return f'{{"name":{json.dumps(name)},"materials":[{",".join(materials)}]}}'.encode()


def many(count: int, concentration: str) -> bytes:
    return body(*(mat(f"Material {index}", concentration) for index in range(count)))


def fields(raw: bytes) -> list[str]:
    with pytest.raises(InvalidFormula) as caught:
        parse_formula(raw)
    return sorted(error.field for error in caught.value.errors)


def messages(raw: bytes) -> list[str]:
    with pytest.raises(InvalidFormula) as caught:
        parse_formula(raw)
    return [error.message for error in caught.value.errors]


# --- the table --------------------------------------------------------------

VALID = [
    pytest.param(
        SPEC_EXAMPLE,
        "Summer Breeze",
        [("Bergamot Oil", "15.5"), ("Lavender Absolute", "10"), ("Sandalwood", "5.2")],
        id="the SPEC example",
    ),
    pytest.param(body(mat("Rose", "1.0000000")), "Test", [("Rose", "1")], id="1.0000000 is 1"),
    pytest.param(body(mat("Rose", "100")), "Test", [("Rose", "100")], id="one material at 100"),
    pytest.param(body(mat("A", "0.000001")), "Test", [("A", "0.000001")], id="six decimal places"),
    pytest.param(
        body(mat("A", "0.0000010")), "Test", [("A", "0.000001")], id="trailing zero not a place"
    ),
    pytest.param(
        body(mat("A", "1E+1"), mat("B", "2e0"), mat("C", "300e-1")),
        "Test",
        [("A", "10"), ("B", "2"), ("C", "30")],
        id="exponent spellings",
    ),
    pytest.param(
        body(mat("A", "0.1"), mat("B", "0.2"), mat("C", "99.7")),
        "Test",
        [("A", "0.1"), ("B", "0.2"), ("C", "99.7")],
        id="0.1 + 0.2 + 99.7 is exactly 100",
    ),
    pytest.param(
        body(mat("A", "33.333333"), mat("B", "33.333333"), mat("C", "33.333334")),
        "Test",
        [("A", "33.333333"), ("B", "33.333333"), ("C", "33.333334")],
        id="a sum of exactly 100",
    ),
    pytest.param(
        body(mat("  Rose \u3000"), name="\u00a0 Summer Breeze \n"),
        "Summer Breeze",
        [("Rose", "10")],
        id="names are trimmed of Unicode whitespace",
    ),
    pytest.param(
        body(mat("Rose\n")), "Test", [("Rose", "10")], id="a control character trimmed away"
    ),
    pytest.param(
        body(mat("a" * MAX_NAME_LENGTH), name="b" * MAX_NAME_LENGTH),
        "b" * MAX_NAME_LENGTH,
        [("a" * MAX_NAME_LENGTH, "10")],
        id="200 characters",
    ),
    pytest.param(
        body(mat(" " + "a" * MAX_NAME_LENGTH + " ")),
        "Test",
        [("a" * MAX_NAME_LENGTH, "10")],
        id="200 characters once trimmed",
    ),
    pytest.param(
        body(mat("Rosé Absolue 玫瑰 \U0001f339")),
        "Test",
        [("Rosé Absolue 玫瑰 \U0001f339", "10")],
        id="non-ASCII names",
    ),
    pytest.param(
        b'{"name":"Test","materials":[{"name":"\\ud83c\\udf39","concentration":1}]}',
        "Test",
        [("\U0001f339", "1")],
        id="an escaped surrogate pair is one character",
    ),
    pytest.param(
        b'\r\n {"materials": [{"concentration": 5, "name": "Rose"}], "name": "Test"} \t',
        "Test",
        [("Rose", "5")],
        id="any key order, JSON whitespace around",
    ),
    pytest.param(
        body(mat("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[")),
        "Test",
        [("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "10")],
        id="brackets inside strings are not nesting",
    ),
]


@pytest.mark.parametrize(("raw", "name", "materials"), VALID)
def test_a_valid_body_becomes_a_draft_with_trimmed_names_and_exact_concentrations(
    raw: bytes, name: str, materials: list[tuple[str, str]]
) -> None:
    draft = parse_formula(raw)
    assert draft.name == name
    assert [(m.name, decimal_text(m.concentration)) for m in draft.materials] == materials
    assert draft.fingerprint == fingerprint(draft.materials)


def test_500_materials_adding_up_to_exactly_100_are_accepted() -> None:
    draft = parse_formula(many(MAX_MATERIALS, "0.2"))
    assert len(draft.materials) == MAX_MATERIALS


def test_a_body_of_exactly_65536_bytes_is_accepted() -> None:
    raw = body(mat())
    raw += b" " * (MAX_BODY_BYTES - len(raw))
    assert len(raw) == MAX_BODY_BYTES
    assert parse_formula(raw).materials == (Material("Rose", Decimal(10)),)


INVALID = [
    # the body as a whole (bodies that are not acceptable JSON at all, such as
    # empty, too large, not UTF-8, nested too deep or NaN, are in
    # tests/test_strict_json.py)
    pytest.param(b"[]", ["body"], id="an array at the top"),
    pytest.param(b'"Test"', ["body"], id="a string at the top"),
    pytest.param(b"null", ["body"], id="null at the top"),
    pytest.param(b"10", ["body"], id="a number at the top"),
    # key sets
    pytest.param(
        b'{"name":"A","name":"B","materials":[{"name":"Rose","concentration":1}]}',
        ["body"],
        id="a repeated top-level key",
    ),
    pytest.param(
        b'{"name":"A","materials":[{"name":"Rose","concentration":1,"concentration":2}]}',
        ["materials[0]"],
        id="a repeated key in a material",
    ),
    pytest.param(
        b'{"name":"A","materials":[{"name":"Rose","concentration":1}],"x":1}',
        ["body"],
        id="an unknown top-level key",
    ),
    pytest.param(
        b'{"name":"A","materials":[{"name":"Rose","concentration":1,"note":""}]}',
        ["materials[0]"],
        id="an unknown key in a material",
    ),
    pytest.param(b'{"materials":[{"name":"Rose","concentration":1}]}', ["name"], id="no name"),
    pytest.param(b'{"name":"A"}', ["materials"], id="no materials"),
    pytest.param(b"{}", ["materials", "name"], id="an empty object"),
    pytest.param(
        b'{"name":"A","materials":[{"concentration":1}]}',
        ["materials[0].name"],
        id="a material without a name",
    ),
    pytest.param(
        b'{"name":"A","materials":[{"name":"Rose"}]}',
        ["materials[0].concentration"],
        id="a material without a concentration",
    ),
    # names
    pytest.param(b'{"name":5,"materials":[{"name":"R","concentration":1}]}', ["name"], id="5"),
    pytest.param(
        b'{"name":null,"materials":[{"name":"R","concentration":1}]}', ["name"], id="null name"
    ),
    pytest.param(
        b'{"name":"A","materials":[{"name":["R"],"concentration":1}]}',
        ["materials[0].name"],
        id="an array as a material name",
    ),
    pytest.param(body(mat(), name=""), ["name"], id="an empty name"),
    pytest.param(body(mat(" \t\u3000\u00a0")), ["materials[0].name"], id="whitespace name"),
    pytest.param(body(mat(), name="a" * 201), ["name"], id="201 characters"),
    pytest.param(body(mat(" " + "a" * 201 + " ")), ["materials[0].name"], id="201 trimmed"),
    pytest.param(body(mat("Ro\x00se")), ["materials[0].name"], id="NUL inside a name"),
    pytest.param(body(mat("Ro\tse")), ["materials[0].name"], id="a tab inside a name"),
    pytest.param(body(mat("Ro\x7fse")), ["materials[0].name"], id="DEL inside a name"),
    pytest.param(body(mat("Ro\x85se")), ["materials[0].name"], id="a C1 control in a name"),
    pytest.param(body(mat(), name="Test\ud800"), ["name"], id="a lone high surrogate"),
    pytest.param(body(mat("\udfffRose")), ["materials[0].name"], id="a lone low surrogate"),
    pytest.param(body(mat("\ude00\ud83d")), ["materials[0].name"], id="a reversed pair"),
    # materials
    pytest.param(b'{"name":"A","materials":{}}', ["materials"], id="materials an object"),
    pytest.param(b'{"name":"A","materials":null}', ["materials"], id="materials null"),
    pytest.param(b'{"name":"A","materials":[]}', ["materials"], id="no materials listed"),
    pytest.param(many(MAX_MATERIALS + 1, "0.1"), ["materials"], id="501 materials"),
    pytest.param(b'{"name":"A","materials":[1]}', ["materials[0]"], id="a number as a material"),
    pytest.param(b'{"name":"A","materials":[null]}', ["materials[0]"], id="null as a material"),
    pytest.param(
        body(mat("Rose", "1"), mat("rOSE", "2")), ["materials[1].name"], id="same name, case"
    ),
    pytest.param(
        body(mat("Bergamot Oil", "1"), mat(" bergamot  OIL", "2")),
        ["materials[1].name"],
        id="same name, spacing",
    ),
    pytest.param(
        body(mat("Bergamot Oil", "1"), mat("Bergamot\u00a0Oil", "2")),
        ["materials[1].name"],
        id="same name, a no-break space",
    ),
    pytest.param(
        body(mat("Rose", "1"), mat("\uff32\uff4f\uff53\uff45", "2")),
        ["materials[1].name"],
        id="same name, full-width letters",
    ),
    pytest.param(
        body(mat("Rose", "1"), mat("Iris", "2"), mat("ROSE", "3"), mat("rose", "4")),
        ["materials[2].name", "materials[3].name"],
        id="every later duplicate is reported",
    ),
    # concentrations
    pytest.param(body(mat("Rose", '"10"')), ["materials[0].concentration"], id="a string"),
    pytest.param(body(mat("Rose", "true")), ["materials[0].concentration"], id="true"),
    pytest.param(body(mat("Rose", "false")), ["materials[0].concentration"], id="false"),
    pytest.param(body(mat("Rose", "null")), ["materials[0].concentration"], id="null"),
    pytest.param(body(mat("Rose", "[10]")), ["materials[0].concentration"], id="an array"),
    pytest.param(body(mat("Rose", "{}")), ["materials[0].concentration"], id="an object"),
    pytest.param(body(mat("Rose", "0")), ["materials[0].concentration"], id="zero"),
    pytest.param(body(mat("Rose", "-0.0")), ["materials[0].concentration"], id="minus zero"),
    pytest.param(body(mat("Rose", "-1")), ["materials[0].concentration"], id="negative"),
    pytest.param(body(mat("Rose", "100.000001")), ["materials[0].concentration"], id="over 100"),
    pytest.param(body(mat("Rose", "0.0000001")), ["materials[0].concentration"], id="7 places"),
    pytest.param(body(mat("Rose", "1.0000001")), ["materials[0].concentration"], id="7 places"),
    pytest.param(
        body(mat("Rose", "-0.0000001")),
        ["materials[0].concentration", "materials[0].concentration"],
        id="negative and 7 places",
    ),
    pytest.param(body(mat("Rose", "1e999999999")), ["materials[0].concentration"], id="1e+big"),
    pytest.param(body(mat("Rose", "1e-999999999")), ["materials[0].concentration"], id="1e-big"),
    pytest.param(
        body(mat("Rose", "1" + "0" * 5000)), ["materials[0].concentration"], id="5001 digits"
    ),
    pytest.param(body(mat("A", "60"), mat("B", "40.000001")), ["materials"], id="sum over 100"),
    pytest.param(body(mat("A", "50.5"), mat("B", "50.5")), ["materials"], id="sum of 101"),
    # several problems at once
    pytest.param(
        b'{"name":5,"materials":[{"name":"Rose","concentration":"x"}]}',
        ["materials[0].concentration", "name"],
        id="two bad fields",
    ),
    pytest.param(
        b'{"name":"","x":1,"materials":[{"name":"A","concentration":0},'
        b'{"name":"a","concentration":200,"y":2},3,{"concentration":true}]}',
        [
            "body",
            "materials[0].concentration",
            "materials[1]",
            "materials[1].concentration",
            "materials[1].name",
            "materials[2]",
            "materials[3].concentration",
            "materials[3].name",
            "name",
        ],
        id="nine problems",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), INVALID)
def test_an_invalid_body_lists_every_problem_at_its_field(raw: bytes, expected: list[str]) -> None:
    assert fields(raw) == sorted(expected)


def test_every_unicode_control_character_inside_a_name_is_refused_and_nothing_else() -> None:
    controls = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cc"]
    neighbours = ["\x20", "\xa0", "\xa1", "\u200b", "\u2028", "\ufeff", "\U000e0001"]
    materials = [
        {"name": f"a{char}{index}", "concentration": Decimal("0.1")}
        for index, char in enumerate(controls + neighbours)
    ]
    with pytest.raises(InvalidFormula) as caught:
        validate_formula({"name": "Test", "materials": materials})
    assert [e.field for e in caught.value.errors] == [
        f"materials[{index}].name" for index in range(len(controls))
    ]
    accepted = validate_formula({"name": "Test", "materials": materials[len(controls) :]})
    assert len(accepted.materials) == len(neighbours)


def test_a_duplicate_material_names_the_index_it_repeats() -> None:
    raw = body(mat("Rose", "1"), mat("Iris", "2"), mat(" ROSE ", "3"))
    assert messages(raw) == ["is the same material as materials[0]"]


def test_unknown_and_repeated_keys_are_named_in_their_messages() -> None:
    raw = b'{"name":"A","name":"B","colour":"red","materials":[{"name":"R","concentration":1}]}'
    assert messages(raw) == ['repeats key "name"', 'has unknown key "colour"']


def test_messages_stay_encodable_whatever_the_client_sent_as_a_key() -> None:
    raw = b'{"name":"A","\\ud800\\u0000' + b"k" * 100 + b'":1,"materials":[]}'
    for message in messages(raw):
        message.encode("utf-8")
        assert len(message) < 100


def test_the_sum_message_gives_the_exact_total() -> None:
    raw = body(mat("A", "60.1"), mat("B", "40.000001"))
    assert messages(raw) == ["concentrations add up to 100.100001, more than 100"]


def test_a_64_kib_body_of_500_materials_validates() -> None:
    # Its speed is measured in bench/, not asserted here.
    long_name = "x" * 96
    raw = body(*(mat(f"{long_name}{index:03}", "0.2") for index in range(MAX_MATERIALS)))
    assert MAX_BODY_BYTES - 2000 < len(raw) <= MAX_BODY_BYTES
    assert len(parse_formula(raw).materials) == MAX_MATERIALS


def test_validate_formula_takes_documents_built_in_python() -> None:
    draft = validate_formula({"name": "T", "materials": [{"name": "Rose", "concentration": 5}]})
    assert draft.materials == (Material("Rose", Decimal(5)),)
    with pytest.raises(InvalidFormula) as caught:
        validate_formula({"name": "T", "materials": [{"name": "Rose", "concentration": 5.0}]})
    assert [e.field for e in caught.value.errors] == ["materials[0].concentration"]
    with pytest.raises(InvalidFormula) as caught:
        validate_formula(
            {"name": "T", "materials": [{"name": "R", "concentration": Decimal("NaN")}]}
        )
    assert [e.message for e in caught.value.errors] == ["must be a finite number"]


# --- exact decimals -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "text"),
    [
        ("15.5", "15.5"),
        ("15.50", "15.5"),
        ("10", "10"),
        ("10.0", "10"),
        ("1e1", "10"),
        ("1E+1", "10"),
        ("10.000", "10"),
        ("100.000000", "100"),
        ("1.0000000", "1"),
        ("0.000001", "0.000001"),
        ("1e-6", "0.000001"),
        ("0.0000010", "0.000001"),
        ("1E-7", "0.0000001"),
        ("-12.3400", "-12.34"),
        ("-0.0", "0"),
        ("0E+5", "0"),
        (
            "1234567890123456789012345678901234567.891000",
            "1234567890123456789012345678901234567.891",
        ),
    ],
)
def test_decimal_text_is_plain_exact_and_without_trailing_zeros(spelling: str, text: str) -> None:
    assert decimal_text(Decimal(spelling)) == text


def test_canonical_decimal_gives_one_representation_per_value() -> None:
    representations = {canonical_decimal(Decimal(s)).as_tuple() for s in ("10", "10.0", "1e1")}
    assert representations == {Decimal("10").as_tuple()}
    assert str(canonical_decimal(Decimal("10.000"))) == "10"
    assert str(canonical_decimal(Decimal("1.5000"))) == "1.5"


def test_canonical_decimal_never_rounds_to_the_context_precision() -> None:
    forty = "1234567890123456789012345678901234567890"
    assert canonical_decimal(Decimal(forty + ".000")).as_tuple() == Decimal(forty).as_tuple()
    assert canonical_decimal(Decimal("0." + forty[:-1])) == Decimal("0." + forty[:-1])


def test_canonical_decimal_keeps_huge_exponents_compact() -> None:
    assert str(canonical_decimal(Decimal("1000e999999996"))) == "1E+999999999"
    assert canonical_json(parse_json(b"[1e999999999, 1e-999999999]")) == (
        "[1E+999999999,1E-999999999]"
    )


def test_canonical_decimal_refuses_nan_and_infinity() -> None:
    for special in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError):
            canonical_decimal(Decimal(special))


def test_concentrations_never_pass_through_a_float() -> None:
    draft = parse_formula(body(mat("A", "15.5"), mat("B", "0.1"), mat("C", "0.2")))
    assert [str(m.concentration) for m in draft.materials] == ["15.5", "0.1", "0.2"]
    assert sum(m.concentration for m in draft.materials) == Decimal("15.8")


@modest
@given(st.integers(min_value=1, max_value=100_000_000))
def test_str_of_a_valid_concentration_is_its_plain_decimal_text(micro: int) -> None:
    (material,) = parse_formula(body(mat("A", f"{micro}e-6"))).materials
    assert str(material.concentration) == decimal_text(material.concentration)
    assert "E" not in str(material.concentration)


# --- identity -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (" bergamot  OIL", "Bergamot Oil"),
        ("\uff32\uff4f\uff53\uff45", "rose"),
        ("Bergamot\u00a0Oil", "bergamot oil"),
        ("Bergamot\u3000\u2003Oil", "bergamot oil"),
        ("Stra\u00dfe", "STRASSE"),
        ("\ufb01r", "fir"),
        ("Ros\u00e9", "ROSE\u0301"),
    ],
)
def test_names_that_differ_only_in_case_spacing_or_compatibility_share_a_key(
    one: str, other: str
) -> None:
    assert material_key(one) == material_key(other)


def test_a_materials_key_property_is_its_material_key() -> None:
    assert Material(" bergamot  OIL", Decimal(1)).key == "bergamot oil"


def test_different_names_have_different_keys() -> None:
    assert material_key("Rose") != material_key("Roses")
    assert material_key("Rose Oil") != material_key("RoseOil")


def test_the_spec_example_has_a_pinned_fingerprint() -> None:
    assert parse_formula(SPEC_EXAMPLE).fingerprint == SPEC_EXAMPLE_FINGERPRINT


def test_the_fingerprint_uses_the_versioned_canonical_encoding() -> None:
    payload = '[["bergamot oil","15.5"],["lavender absolute","10"],["sandalwood","5.2"]]'
    expected = hashlib.sha256(b"formulary.fingerprint.v1\n" + payload.encode()).hexdigest()
    assert expected == SPEC_EXAMPLE_FINGERPRINT


NAME = st.lists(
    st.text(alphabet=string.ascii_letters + "éß", min_size=1, max_size=8), min_size=1, max_size=3
).map(" ".join)


@st.composite
def formulas(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Distinct material names with concentrations in millionths, adding up to at most 100."""
    names = draw(st.lists(NAME, min_size=1, max_size=8, unique_by=material_key))
    # 8 materials of at most 12.5 each cannot exceed 100.
    micros = st.integers(min_value=1, max_value=12_500_000)
    return [(name, draw(micros)) for name in names]


def _decimal(micro: int) -> Decimal:
    return Decimal(f"{micro}e-6")


SPELLINGS = {
    "plain": lambda d: decimal_text(d),
    "trailing zeros": lambda d: decimal_text(d) + ("000" if "." in decimal_text(d) else ".000"),
    "lower exponent": lambda d: format(d, "e"),
    "upper exponent": lambda d: format(d, "E"),
    "millionths": lambda d: f"{int(d * 1_000_000)}e-6",
    "billionths": lambda d: f"{int(d * 1_000_000_000)}E-9",
}


def _variants(char: str) -> list[str]:
    variants = [char, char.upper(), char.lower()]
    if char in string.ascii_letters:
        variants.append(chr(ord(char) - 0x21 + 0xFF01))  # its full-width form
    if char == "é":
        variants.append("e\u0301")
    return variants


@st.composite
def respelled(draw: st.DrawFn, name: str) -> str:
    """The same material key, written differently."""
    padding = st.sampled_from(["", " ", "\u3000", "\u00a0 "])
    gap = st.sampled_from([" ", "  ", "\u00a0", "\u3000", " \u2003 "])
    words = ["".join(draw(st.sampled_from(_variants(c))) for c in word) for word in name.split()]
    inner = words[0] + "".join(draw(gap) + word for word in words[1:])
    return draw(padding) + inner + draw(padding)


def _render(formula_name: str, items: list[tuple[str, str]]) -> bytes:
    return body(*(mat(name, concentration) for name, concentration in items), name=formula_name)


@modest
@given(formulas(), st.data())
def test_order_spelling_case_and_spacing_never_change_the_fingerprint(
    formula: list[tuple[str, int]], data: st.DataObject
) -> None:
    original = parse_formula(
        _render("F", [(name, decimal_text(_decimal(m))) for name, m in formula])
    )
    shuffled = data.draw(st.permutations(formula))
    items = []
    for name, micro in shuffled:
        spell = data.draw(st.sampled_from(sorted(SPELLINGS)))
        items.append((data.draw(respelled(name)), SPELLINGS[spell](_decimal(micro))))
    again = parse_formula(_render("F", items))
    assert again.fingerprint == original.fingerprint


@modest
@given(formulas(), NAME, NAME)
def test_the_formulas_own_name_never_affects_the_fingerprint(
    formula: list[tuple[str, int]], one: str, other: str
) -> None:
    items = [(name, decimal_text(_decimal(micro))) for name, micro in formula]
    assert parse_formula(_render(one, items)).fingerprint == (
        parse_formula(_render(other, items)).fingerprint
    )


@modest
@given(formulas(), st.data())
def test_changing_any_concentration_changes_the_fingerprint(
    formula: list[tuple[str, int]], data: st.DataObject
) -> None:
    materials = [Material(name, _decimal(micro)) for name, micro in formula]
    index = data.draw(st.integers(min_value=0, max_value=len(materials) - 1))
    micro = formula[index][1]
    changed = data.draw(
        st.integers(min_value=1, max_value=100_000_000).filter(lambda other: other != micro)
    )
    altered = [*materials]
    altered[index] = Material(materials[index].name, _decimal(changed))
    assert fingerprint(altered) != fingerprint(materials)


@modest
@given(formulas(), st.data())
def test_changing_any_material_key_changes_the_fingerprint(
    formula: list[tuple[str, int]], data: st.DataObject
) -> None:
    materials = [Material(name, _decimal(micro)) for name, micro in formula]
    keys = {material.key for material in materials}
    index = data.draw(st.integers(min_value=0, max_value=len(materials) - 1))
    renamed = data.draw(NAME.filter(lambda name: material_key(name) not in keys))
    altered = [*materials]
    altered[index] = Material(renamed, materials[index].concentration)
    assert fingerprint(altered) != fingerprint(materials)


# --- canonical_json -------------------------------------------------------------


def test_bodies_equal_as_parsed_json_have_one_canonical_text() -> None:
    one = parse_json(b'{"b": 1, "a": [1.0, 1e0, 10.000, "x\\u00e9"], "c": null}')
    other = parse_json(b'{"c":null,"a":[1,1E+0,1E1,"x\xc3\xa9"],"b":1.00}')
    assert canonical_json(one) == canonical_json(other)
    assert canonical_json(one) == '{"a":[1,1,10,"x\\u00e9"],"b":1,"c":null}'


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (b"[1]", b"[1.000001]"),
        (b"[1]", b'["1"]'),
        (b"[1]", b"[true]"),
        (b"[0]", b"[false]"),
        (b"[null]", b"[]"),
        (b'{"a":1}', b'{"A":1}'),
        (b"[1,2]", b"[2,1]"),
        (b'["Rose"]', b'["rose"]'),
    ],
)
def test_bodies_that_differ_as_parsed_json_have_different_canonical_texts(
    one: bytes, other: bytes
) -> None:
    assert canonical_json(parse_json(one)) != canonical_json(parse_json(other))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.decimals(allow_nan=False, allow_infinity=False, places=4)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _dump(value: object, reverse: bool) -> str:
    """JSON text of a value, with numbers and key order written two ways."""
    if isinstance(value, dict):
        keys = sorted(value, reverse=reverse)
        parts = (f"{json.dumps(key)} : {_dump(value[key], reverse)}" for key in keys)
        return "{ " + " , ".join(parts) + " }"
    if isinstance(value, list):
        return "[" + ",\n".join(_dump(item, reverse) for item in value) + "]"
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        number = Decimal(value)
        return format(number, "E") if reverse else str(number)
    return json.dumps(value, ensure_ascii=reverse)


@modest
@given(JSON_VALUES)
def test_canonical_json_ignores_key_order_spacing_and_number_spelling(value: object) -> None:
    one = parse_json(_dump(value, reverse=False).encode())
    other = parse_json(_dump(value, reverse=True).encode())
    assert canonical_json(one) == canonical_json(other)
    assert json.loads(canonical_json(one), parse_float=Decimal, parse_int=Decimal) == one


# --- never anything but InvalidFormula -------------------------------------------

TOKENS = [
    *'{}[]",:. -+eE0123456789\\u',
    "true",
    "false",
    "null",
    "NaN",
    "Infinity",
    '"name"',
    '"materials"',
    '"concentration"',
    "\\ud800",
    "\\u0000",
    "\u00a0",
    "\x00",
    "1e999999999",
    "1e-999999999",
    "9" * 5000,
    "[" * 40,
]


def _survives(raw: bytes) -> None:
    try:
        result = parse_formula(raw)
    except InvalidFormula as exc:
        assert exc.errors
        for error in exc.errors:
            error.message.encode("utf-8")
    else:
        assert isinstance(result, FormulaDraft)
    try:
        document = parse_json(raw)
    except InvalidFormula:
        return
    canonical_json(document).encode("ascii")


@modest
@given(st.binary(max_size=256))
def test_arbitrary_bytes_give_a_draft_or_invalid_formula(raw: bytes) -> None:
    _survives(raw)


@modest
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_json_ish_text_gives_a_draft_or_invalid_formula(text: str) -> None:
    _survives(text.encode("utf-8", "surrogatepass"))


@modest
@given(st.data())
def test_a_mangled_valid_body_gives_a_draft_or_invalid_formula(data: st.DataObject) -> None:
    start = data.draw(st.integers(min_value=0, max_value=len(SPEC_EXAMPLE)))
    end = data.draw(st.integers(min_value=start, max_value=len(SPEC_EXAMPLE)))
    insert = data.draw(st.lists(st.sampled_from(TOKENS), max_size=5).map("".join))
    _survives(SPEC_EXAMPLE[:start] + insert.encode("utf-8", "surrogatepass") + SPEC_EXAMPLE[end:])


@modest
@given(JSON_VALUES, JSON_VALUES, JSON_VALUES, st.integers(min_value=0, max_value=3))
def test_well_formed_json_of_the_wrong_shape_gives_a_draft_or_invalid_formula(
    name: object, material_name: object, concentration: object, count: int
) -> None:
    material = {"name": material_name, "concentration": concentration}
    document = {"name": name, "materials": [material] * count}
    _survives(_dump(document, reverse=False).encode("utf-8", "surrogatepass"))


# --- crossing the manager ---------------------------------------------------------


def test_drafts_and_validation_errors_survive_pickling() -> None:
    draft = parse_formula(SPEC_EXAMPLE)
    assert pickle.loads(pickle.dumps(draft)) == draft
    with pytest.raises(InvalidFormula) as caught:
        parse_formula(b'{"name":5,"materials":[]}')
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.errors == caught.value.errors
