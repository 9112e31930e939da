"""The HTTP mapping, in process: the Falcon app on a real (in-memory) broker.

Every failure path checks the response and that nothing was stored or
published (``stats`` unchanged).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import falcon
import falcon.testing
import pytest

from api.app import create_app
from broker.engines.embedded import EmbeddedBroker
from broker.errors import BrokerUnavailable
from broker.settings import Settings
from broker.strict_json import MAX_BODY_BYTES
from tests.support import SUMMER

AUTH_OFF = Settings(auth="off")  # tests/test_auth.py builds apps with keys


@pytest.fixture
def client(broker: EmbeddedBroker) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(broker, AUTH_OFF))


def post(client: falcon.testing.TestClient, body: Any, **headers: str) -> falcon.testing.Result:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.simulate_post("/formulas", body=data, headers=hdrs)


def doc(result: falcon.testing.Result) -> Any:
    return json.loads(result.text, parse_float=Decimal)


def nothing_stored(broker: EmbeddedBroker, formulas: int = 0) -> bool:
    stats = broker.stats()
    return stats.formulas == formulas and stats.published == formulas


# -- 202 / 409 -------------------------------------------------------------------


def test_a_new_make_up_is_accepted_stored_and_published(client, broker) -> None:
    result = post(client, SUMMER)
    assert result.status_code == 202
    body = doc(result)
    assert result.headers["Location"] == f"/formulas/{body['id']}"
    assert body["status"] == "queued"
    assert body["name"] == "Summer Breeze"
    assert [m["concentration"] for m in body["materials"]] == [
        Decimal("15.5"),
        Decimal("10"),
        Decimal("5.2"),
    ]
    assert len(body["fingerprint"]) == 64
    assert body["message_id"] and body["created_at"].endswith("Z")
    assert len(body["id"]) >= 16
    assert nothing_stored(broker, formulas=1)


def test_concentrations_are_written_with_their_exact_digits(client) -> None:
    result = post(
        client,
        '{"name": "x", "materials": [{"name": "a", "concentration": 15.5},'
        ' {"name": "b", "concentration": 0.000001}, {"name": "c", "concentration": 1e1}]}',
    )
    assert result.status_code == 202
    assert '"concentration":15.5}' in result.text
    assert '"concentration":0.000001}' in result.text
    assert '"concentration":10}' in result.text


def test_the_same_make_up_in_another_order_and_name_is_a_conflict(client, broker) -> None:
    first = doc(post(client, SUMMER))
    again = {
        "name": "Winter Breeze",
        "materials": [
            {"name": " sandalwood ", "concentration": 5.20},
            {"name": "BERGAMOT   oil", "concentration": 1.55e1},
            {"name": "Lavender Absolute", "concentration": 10},
        ],
    }
    result = post(client, again)
    assert result.status_code == 409
    assert result.headers["Content-Type"] == "application/problem+json"
    assert result.headers["Location"] == f"/formulas/{first['id']}"
    problem = doc(result)
    assert problem["existing_id"] == first["id"]
    assert problem["fingerprint"] == first["fingerprint"]
    assert problem["status"] == 409 and problem["type"] and problem["title"]
    assert nothing_stored(broker, formulas=1)
    assert broker.stats().duplicates == 1


# -- 400 / 413 / 415 ---------------------------------------------------------------

BAD_BODIES = {
    "not json": b"{nope",
    "invalid utf-8": b'{"name": "\xff", "materials": []}',
    "NaN": b'{"name": "x", "materials": [{"name": "a", "concentration": NaN}]}',
    "Infinity": b'{"name": "x", "materials": [{"name": "a", "concentration": Infinity}]}',
    "duplicate key": b'{"name": "x", "name": "y",'
    b' "materials": [{"name": "a", "concentration": 1}]}',
    "unknown key": b'{"name": "x", "colour": "red",'
    b' "materials": [{"name": "a", "concentration": 1}]}',
    "string number": b'{"name": "x", "materials": [{"name": "a", "concentration": "1"}]}',
    "boolean": b'{"name": "x", "materials": [{"name": "a", "concentration": true}]}',
    "too precise": b'{"name": "x", "materials": [{"name": "a", "concentration": 0.0000001}]}',
    "sum over 100": b'{"name": "x", "materials": [{"name": "a", "concentration": 60},'
    b' {"name": "b", "concentration": 40.000001}]}',
    "zero": b'{"name": "x", "materials": [{"name": "a", "concentration": 0}]}',
    "no materials": b'{"name": "x", "materials": []}',
    "blank name": b'{"name": "  ", "materials": [{"name": "a", "concentration": 1}]}',
    "duplicate material": b'{"name": "x", "materials": [{"name": "Rose", "concentration": 1},'
    b' {"name": " ROSE ", "concentration": 2}]}',
    "too deep": b"[" * 10_000 + b"]" * 10_000,
    "empty": b"",
    "array": b"[]",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_400_problems_and_store_nothing(client, broker, body: bytes) -> None:
    result = post(client, body)
    assert result.status_code == 400, result.text
    assert result.headers["Content-Type"] == "application/problem+json"
    problem = doc(result)
    assert problem["status"] == 400
    assert problem["errors"] and all({"field", "message"} <= set(e) for e in problem["errors"])
    assert "Traceback" not in result.text
    assert nothing_stored(broker)


def test_every_problem_in_a_body_is_listed(client) -> None:
    result = post(
        client,
        {
            "name": "",
            "materials": [{"name": "a", "concentration": -1}, {"name": 3, "concentration": 1}],
        },
    )
    fields = {e["field"] for e in doc(result)["errors"]}
    assert {"name", "materials[0].concentration", "materials[1].name"} <= fields


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8"]
)
def test_json_media_types_are_accepted_in_any_case_with_parameters(client, content_type) -> None:
    result = client.simulate_post(
        "/formulas", body=json.dumps(SUMMER), headers={"Content-Type": content_type}
    )
    assert result.status_code == 202


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/xml", "application/jsonx"]
)
def test_other_media_types_are_415_and_store_nothing(client, broker, content_type) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    result = client.simulate_post("/formulas", body=json.dumps(SUMMER), headers=headers)
    assert result.status_code == 415
    assert doc(result)["status"] == 415
    assert nothing_stored(broker)


def padded(size: int) -> bytes:
    body = json.dumps(SUMMER).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_of_exactly_64_kib_is_accepted(client) -> None:
    body = padded(MAX_BODY_BYTES)
    assert len(body) == 65_536
    assert post(client, body).status_code == 202


def test_a_body_one_byte_over_64_kib_is_413_and_stores_nothing(client, broker) -> None:
    body = padded(MAX_BODY_BYTES + 1)
    result = post(client, body)
    assert result.status_code == 413
    assert doc(result)["status"] == 413
    assert nothing_stored(broker)


def test_a_full_queue_refuses_the_submit_whole_with_retry_after(clock, wall_clock) -> None:
    small = EmbeddedBroker(queue_capacity=1, clock=clock, wall_clock=wall_clock)
    client = falcon.testing.TestClient(create_app(small, AUTH_OFF))
    assert post(client, SUMMER).status_code == 202
    other = {"name": "y", "materials": [{"name": "Musk", "concentration": 1}]}
    result = post(client, other)
    assert result.status_code == 503
    assert result.headers["Retry-After"].isdigit()
    assert doc(result)["status"] == 503
    assert small.stats().formulas == 1 and small.stats().published == 1
    assert small.stats().refused_capacity == 1


class Unreachable:
    """A broker that is never there."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise BrokerUnavailable("connection refused")

        return call


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/formulas"), ("GET", "/formulas"), ("GET", "/formulas/abc"), ("GET", "/health")],
)
def test_an_unreachable_broker_is_503_with_retry_after(method, path) -> None:
    client = falcon.testing.TestClient(create_app(Unreachable(), AUTH_OFF))  # type: ignore[arg-type]
    result = client.simulate_request(
        method, path, body=json.dumps(SUMMER), headers={"Content-Type": "application/json"}
    )
    assert result.status_code == 503
    assert result.headers["Retry-After"].isdigit()
    assert result.headers["Content-Type"] == "application/problem+json"


# -- reads ------------------------------------------------------------------------------


def test_a_stored_formula_can_be_read_back_with_its_state(client) -> None:
    created = doc(post(client, SUMMER))
    result = client.simulate_get(f"/formulas/{created['id']}")
    assert result.status_code == 200
    body = doc(result)
    assert body == created
    assert body["deliveries"] == 0 and body["processed_at"] is None and body["summary"] is None


def test_an_unknown_formula_is_404(client) -> None:
    result = client.simulate_get("/formulas/does-not-exist")
    assert result.status_code == 404
    assert doc(result)["status"] == 404


def formulas(n: int) -> list[dict[str, Any]]:
    return [
        {"name": f"f{i}", "materials": [{"name": "Musk", "concentration": i + 1}]} for i in range(n)
    ]


def test_the_list_pages_newest_first_until_next_is_null(client) -> None:
    ids = [doc(post(client, f))["id"] for f in formulas(5)]
    seen: list[str] = []
    page = doc(client.simulate_get("/formulas", params={"limit": "2"}))
    while True:
        seen += [item["id"] for item in page["items"]]
        if page["next"] is None:
            break
        page = doc(client.simulate_get("/formulas", params={"limit": "2", "cursor": page["next"]}))
    assert seen == list(reversed(ids))


def test_the_list_defaults_to_50(client) -> None:
    for f in formulas(51):
        post(client, f)
    page = doc(client.simulate_get("/formulas"))
    assert len(page["items"]) == 50 and page["next"]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "ten"},
        {"limit": "-1"},
        {"limit": "\u00b2"},  # a digit to str.isdigit, not to int()
        {"limit": "1" * 5000},  # past int()'s digit limit
        {"cursor": "bogus"},
        {"cursor": "czE" * 2000},  # longer than any cursor handed out
    ],
)
def test_a_bad_limit_or_cursor_is_400(client, params) -> None:
    result = client.simulate_get("/formulas", params=params)
    assert result.status_code == 400
    assert doc(result)["errors"][0]["field"] in {"limit", "cursor"}


def test_health_is_200_when_the_broker_answers(client) -> None:
    assert client.simulate_get("/health").status_code == 200


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(client) -> None:
    assert client.simulate_get("/nowhere").status_code == 404
    result = client.simulate_delete("/formulas")
    assert result.status_code == 405
    assert "POST" in result.headers["Allow"] and "GET" in result.headers["Allow"]
    assert doc(result)["title"] == "Method Not Allowed"


# -- Idempotency-Key ------------------------------------------------------------------


def test_a_retry_with_the_same_key_and_body_replays_the_202_byte_for_byte(client, broker) -> None:
    first = post(client, SUMMER, Idempotency_Key="order-1")
    again = post(client, json.dumps(SUMMER, indent=2), Idempotency_Key="order-1")
    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert broker.stats().formulas == 1 and broker.stats().published == 1


def test_a_replayed_409_is_the_same_409(client) -> None:
    post(client, SUMMER)
    first = post(client, SUMMER, Idempotency_Key="k2")
    again = post(client, SUMMER, Idempotency_Key="k2")
    assert first.status_code == again.status_code == 409
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"


def test_the_same_key_with_another_body_is_422_and_stores_nothing(client, broker) -> None:
    post(client, SUMMER, Idempotency_Key="k3")
    other = {"name": "y", "materials": [{"name": "Musk", "concentration": 1}]}
    result = post(client, other, Idempotency_Key="k3")
    assert result.status_code == 422
    assert nothing_stored(broker, formulas=1)


def test_a_rejected_body_does_not_use_up_its_key(client) -> None:
    assert post(client, {"name": "x"}, Idempotency_Key="k4").status_code == 400
    assert post(client, SUMMER, Idempotency_Key="k4").status_code == 202


def test_a_quoted_key_is_the_same_key(client) -> None:
    first = post(client, SUMMER, Idempotency_Key='"k5"')
    again = post(client, SUMMER, Idempotency_Key="k5")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there", '""'])
def test_a_malformed_key_is_400_and_stores_nothing(client, broker, key) -> None:
    result = client.simulate_post(
        "/formulas",
        body=json.dumps(SUMMER),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    assert result.status_code == 400
    assert nothing_stored(broker)
