"""Who may call: API keys, scopes and rate limits, in process and with the real processes.

In process, the Falcon app runs with ``FORMULARY_AUTH=required`` on a real
in-memory broker, with a fake clock for the cache of ``authenticate``
answers. With the real processes (broker and two gunicorn workers), each row
of the SPEC: every kind of 401 and the 403s store nothing, a revocation
reaches both workers within 2 s, Idempotency-Keys belong to their API key,
the rate limit answers 429, and no secret shows in any log line. These
stacks set ``FORMULARY_AUTH=required`` themselves, whatever
``FORMULARY_TEST_AUTH`` says.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import falcon
import falcon.testing
import pytest
import requests
import schemathesis
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.auth import AnswerCache
from broker.apikeys import METRICS, READ, SCOPES, SUBMIT
from broker.engines.embedded import EmbeddedBroker
from broker.errors import BrokerUnavailable
from broker.interface import ApiKey
from broker.settings import Settings
from tests.conftest import FakeClock
from tests.support import (
    ROOT,
    SUMMER,
    Http,
    Response,
    Stack,
    admin_cli,
    answered_by,
    running_stack,
    wait_for,
)
from tests.test_openapi import CHECKS

REQUIRED = Settings(auth="required")
CHALLENGE = 'Bearer realm="formulary"'
INVALID_TOKEN = 'Bearer realm="formulary", error="invalid_token"'
# Well formed (fmk.<id>.<43 characters>), but no broker ever made it.
UNKNOWN = "fmk.NoSuchKey1." + "A" * 43


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 1}]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def doc(result: falcon.testing.Result) -> Any:
    return json.loads(result.text, parse_float=Decimal)


# -- in process ---------------------------------------------------------------------


@pytest.fixture
def cache_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(broker: EmbeddedBroker, cache_clock: FakeClock) -> falcon.testing.TestClient:
    app = create_app(broker, REQUIRED, auth_cache=AnswerCache(clock=cache_clock))
    return falcon.testing.TestClient(app)


def post(
    client: falcon.testing.TestClient, body: Any, secret: str | None, **headers: str
) -> falcon.testing.Result:
    hdrs = {"Content-Type": "application/json", **(bearer(secret) if secret else {})}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.simulate_post("/formulas", body=json.dumps(body), headers=hdrs)


def nothing_stored(broker: EmbeddedBroker) -> bool:
    stats = broker.stats()
    return stats.formulas == 0 and stats.published == 0


def assert_refused(result: falcon.testing.Result, status: int, challenge: str | None) -> None:
    assert result.status_code == status, result.text
    assert result.headers["Content-Type"] == "application/problem+json"
    assert doc(result)["status"] == status
    assert result.headers.get("WWW-Authenticate") == challenge


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, CHALLENGE),
        ("", CHALLENGE),
        ("Basic dXNlcjpwYXNz", CHALLENGE),  # another scheme: no bearer token was given
        ("Bearer", CHALLENGE),
        ("Bearer not-a-secret", INVALID_TOKEN),
        ("Bearer fmk.short.x", INVALID_TOKEN),
        (f"Bearer {UNKNOWN}", INVALID_TOKEN),
        (f"Bearer {UNKNOWN} extra", INVALID_TOKEN),
    ],
)
def test_a_missing_malformed_or_unknown_key_is_401_with_a_challenge_and_stores_nothing(
    client, broker, authorization, challenge
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    result = client.simulate_post("/formulas", body=json.dumps(SUMMER), headers=headers)
    assert_refused(result, 401, challenge)
    assert nothing_stored(broker)
    assert UNKNOWN not in result.text


def test_the_scheme_is_case_insensitive(client, broker) -> None:
    secret = broker.create_key("ci", [SUBMIT]).secret
    result = post(client, SUMMER, None, Authorization=f"bearer {secret}")
    assert result.status_code == 202


def test_another_keys_secret_for_a_known_id_is_401(client, broker) -> None:
    made = broker.create_key("victim", [SUBMIT])
    forged = f"fmk.{made.key.id}.{'B' * 43}"
    assert_refused(post(client, SUMMER, forged), 401, INVALID_TOKEN)
    assert nothing_stored(broker)


def test_health_and_the_openapi_document_need_no_key(client) -> None:
    assert client.simulate_get("/health").status_code == 200
    assert client.simulate_get("/openapi.json").status_code == 200


def test_another_method_on_an_open_path_needs_a_key_then_is_405(client, broker) -> None:
    assert_refused(client.simulate_post("/health"), 401, CHALLENGE)
    secret = broker.create_key("reader", [READ]).secret
    result = client.simulate_post("/health", headers=bearer(secret))
    assert result.status_code == 405 and "GET" in result.headers["Allow"]


def test_an_unknown_path_is_401_without_a_key_and_404_with_one(client, broker) -> None:
    assert_refused(client.simulate_get("/nowhere"), 401, CHALLENGE)
    secret = broker.create_key("reader", [READ]).secret
    assert client.simulate_get("/nowhere", headers=bearer(secret)).status_code == 404
    assert client.simulate_delete("/formulas", headers=bearer(secret)).status_code == 405


@pytest.mark.parametrize(
    ("scopes", "method", "path", "needed"),
    [
        ([READ, METRICS], "POST", "/formulas", SUBMIT),
        ([SUBMIT, METRICS], "GET", "/formulas", READ),
        ([SUBMIT], "GET", "/formulas/some-formula-id", READ),
        ([SUBMIT, READ], "GET", "/metrics", METRICS),
    ],
)
def test_a_valid_key_without_the_routes_scope_is_403_and_stores_nothing(
    client, broker, scopes, method, path, needed
) -> None:
    secret = broker.create_key("narrow", scopes).secret
    headers = {**bearer(secret), "Content-Type": "application/json"}
    result = client.simulate_request(method, path, body=json.dumps(SUMMER), headers=headers)
    assert_refused(result, 403, f'{CHALLENGE}, error="insufficient_scope", scope="{needed}"')
    assert needed in doc(result)["detail"]
    assert nothing_stored(broker)


def test_each_scope_opens_its_routes(client, broker) -> None:
    submit = broker.create_key("submit", [SUBMIT]).secret
    read = broker.create_key("read", [READ]).secret
    metrics = broker.create_key("metrics", [METRICS]).secret
    created = post(client, SUMMER, submit)
    assert created.status_code == 202
    path = f"/formulas/{doc(created)['id']}"
    assert client.simulate_get(path, headers=bearer(read)).status_code == 200
    assert client.simulate_get("/formulas", headers=bearer(read)).status_code == 200
    assert client.simulate_get("/metrics", headers=bearer(metrics)).status_code == 200


def test_a_refused_post_leaves_its_body_unread_and_closes_the_connection(client, broker) -> None:
    reader = broker.create_key("reader", [READ]).secret
    for secret in (None, UNKNOWN, reader):
        result = post(client, SUMMER, secret)
        assert result.status_code in (401, 403)
        assert result.headers["Connection"] == "close"
    assert nothing_stored(broker)


def test_a_revoked_key_is_refused_once_the_cached_answer_is_a_second_old(
    client, broker, cache_clock
) -> None:
    made = broker.create_key("soon revoked", [READ])
    headers = bearer(made.secret)
    assert client.simulate_get("/formulas", headers=headers).status_code == 200
    broker.revoke_key(made.key.id)
    cache_clock.advance(0.9)
    assert client.simulate_get("/formulas", headers=headers).status_code == 200  # cached
    cache_clock.advance(0.1)
    assert_refused(client.simulate_get("/formulas", headers=headers), 401, INVALID_TOKEN)


def test_a_key_made_after_a_miss_is_accepted_once_the_miss_is_a_second_old(
    client, broker, cache_clock
) -> None:
    made = broker.create_key("first", [READ])
    broker.revoke_key(made.key.id)
    assert client.simulate_get("/formulas", headers=bearer(made.secret)).status_code == 401
    cache_clock.advance(1.0)
    other = broker.create_key("second", [READ])
    assert client.simulate_get("/formulas", headers=bearer(other.secret)).status_code == 200


class CountingBroker:
    """The broker, counting its ``authenticate`` calls."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self._broker = broker
        self.authentications = 0

    def authenticate(self, key_id: str, secret_digest: str) -> ApiKey | None:
        self.authentications += 1
        return self._broker.authenticate(key_id, secret_digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)


def test_answers_are_cached_a_second_so_a_busy_key_costs_one_lookup_a_second(
    broker, cache_clock
) -> None:
    counting = CountingBroker(broker)
    app = create_app(counting, REQUIRED, auth_cache=AnswerCache(clock=cache_clock))  # type: ignore[arg-type]
    client = falcon.testing.TestClient(app)
    secret = broker.create_key("busy", [READ]).secret
    for _ in range(20):
        assert client.simulate_get("/formulas", headers=bearer(secret)).status_code == 200
        assert client.simulate_get("/formulas", headers=bearer(UNKNOWN)).status_code == 401
    assert counting.authentications == 2  # one hit, one miss
    cache_clock.advance(1.0)
    client.simulate_get("/formulas", headers=bearer(secret))
    assert counting.authentications == 3


def test_the_cache_holds_at_most_its_size_and_drops_the_oldest_first(cache_clock) -> None:
    cache = AnswerCache(seconds=1.0, size=3, clock=cache_clock)
    for n in range(5):
        cache.put((f"key-{n}", "digest"), None)
        cache_clock.advance(0.01)
    assert len(cache) == 3
    assert cache.get(("key-0", "digest")) == (False, None)
    assert cache.get(("key-4", "digest")) == (True, None)
    cache_clock.advance(1.0)
    assert cache.get(("key-4", "digest")) == (False, None)
    cache.put(("key-5", "digest"), None)
    assert len(cache) == 1  # the expired ones went as the new one came


def test_an_unreachable_broker_while_checking_a_key_is_503_with_retry_after() -> None:
    class Unreachable:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                raise BrokerUnavailable("connection refused")

            return call

    client = falcon.testing.TestClient(create_app(Unreachable(), REQUIRED))  # type: ignore[arg-type]
    result = client.simulate_get("/formulas", headers=bearer(UNKNOWN))
    assert result.status_code == 503 and result.headers["Retry-After"].isdigit()
    # No key to check: still 401, the broker is not asked.
    assert client.simulate_get("/formulas").status_code == 401


def test_an_idempotency_key_belongs_to_the_api_key_that_sent_it(client, broker) -> None:
    first = broker.create_key("first", [SUBMIT]).secret
    second = broker.create_key("second", [SUBMIT]).secret
    one, other = formula("one"), formula("other")
    assert post(client, one, first, Idempotency_Key="shared").status_code == 202
    assert post(client, other, second, Idempotency_Key="shared").status_code == 202
    replay = post(client, one, first, Idempotency_Key="shared")
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert post(client, other, first, Idempotency_Key="shared").status_code == 422
    assert broker.stats().formulas == 2


def test_with_auth_off_every_caller_shares_one_idempotency_scope(broker) -> None:
    client = falcon.testing.TestClient(create_app(broker, Settings(auth="off")))
    assert post(client, formula("one"), None, Idempotency_Key="shared").status_code == 202
    assert post(client, formula("other"), UNKNOWN, Idempotency_Key="shared").status_code == 422


@pytest.fixture
def limited(cache_clock: FakeClock) -> tuple[EmbeddedBroker, falcon.testing.TestClient]:
    broker = EmbeddedBroker(rate_limit=2.0, clock=cache_clock)
    settings = Settings(auth="required", rate_limit=2.0)
    app = create_app(broker, settings, auth_cache=AnswerCache(clock=cache_clock))
    return broker, falcon.testing.TestClient(app)


def test_over_the_rate_limit_is_429_with_retry_after_and_stores_nothing(
    limited, cache_clock
) -> None:
    broker, client = limited
    secret = broker.create_key("limited", [SUBMIT, READ]).secret
    other = broker.create_key("other", [READ]).secret
    assert post(client, formula("a"), secret).status_code == 202
    assert post(client, formula("b"), secret).status_code == 202  # the burst: 2
    refused = post(client, formula("c"), secret)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"  # its body was never read
    assert doc(refused)["status"] == 429
    assert broker.stats().formulas == 2
    # Another key has a bucket of its own; /health spends nothing.
    assert client.simulate_get("/formulas", headers=bearer(other)).status_code == 200
    assert client.simulate_get("/health").status_code == 200
    cache_clock.advance(0.5)  # one request's worth at 2/s
    assert post(client, formula("c"), secret).status_code == 202


def test_retry_after_is_whole_seconds_rounded_up(cache_clock) -> None:
    broker = EmbeddedBroker(rate_limit=0.4, clock=cache_clock)
    app = create_app(broker, Settings(auth="required", rate_limit=0.4))
    client = falcon.testing.TestClient(app)
    secret = broker.create_key("slow", [READ]).secret
    assert client.simulate_get("/formulas", headers=bearer(secret)).status_code == 200
    refused = client.simulate_get("/formulas", headers=bearer(secret))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "3"  # 2.5 s


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "api.access"]  # type: ignore[attr-defined]


def test_the_access_line_names_the_key_id_or_the_refusal_and_never_the_secret(
    client, broker, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="api.access")
    made = broker.create_key("logged", [READ])
    client.simulate_get("/formulas", headers=bearer(made.secret))
    client.simulate_get("/formulas", headers=bearer(UNKNOWN))
    client.simulate_get("/formulas")
    client.simulate_post("/formulas", headers=bearer(made.secret))
    ok, unknown, missing, forbidden = access_records(caplog)
    assert (ok["status"], ok["key_id"]) == (200, made.key.id)
    assert (unknown["status"], unknown["refused"]) == (401, "invalid")
    assert (missing["status"], missing["refused"]) == (401, "missing")
    assert "key_id" not in unknown and "key_id" not in missing
    assert (forbidden["status"], forbidden["key_id"], forbidden["refused"]) == (
        403,
        made.key.id,
        "scope",
    )
    assert f"key_id={made.key.id} " in caplog.records[-1].getMessage()
    assert made.secret not in caplog.text and UNKNOWN not in caplog.text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refused(text: str, status: int, reason: str) -> float:
    labels = frozenset({("status", str(status)), ("reason", reason)})
    return samples(text).get(("formulary_auth_refused_total", labels), 0.0)


def by_key(text: str, key_id: str, status: int) -> float:
    labels = frozenset({("key_id", key_id), ("status", str(status))})
    return samples(text).get(("formulary_api_key_requests_total", labels), 0.0)


def test_metrics_count_refusals_by_status_and_reason_and_requests_by_key_id(client, broker) -> None:
    made = broker.create_key("scraper", [METRICS])
    scrape = bearer(made.secret)
    before = client.simulate_get("/metrics", headers=scrape).text
    client.simulate_get("/formulas")
    client.simulate_get("/formulas", headers={"Authorization": "Bearer nope"})
    client.simulate_get("/formulas", headers=bearer(UNKNOWN))
    client.simulate_get("/formulas", headers=scrape)
    after = client.simulate_get("/metrics", headers=scrape).text
    for status, reason, moved in (
        (401, "missing", 1),
        (401, "malformed", 1),
        (401, "invalid", 1),
        (403, "scope", 1),
        (429, "rate_limited", 0),
    ):
        assert refused(after, status, reason) - refused(before, status, reason) == moved, reason
    assert by_key(after, made.key.id, 200) - by_key(before, made.key.id, 200) == 1
    assert by_key(after, made.key.id, 403) - by_key(before, made.key.id, 403) == 1
    assert made.secret not in after


# -- with the real processes ---------------------------------------------------------


class KeyedStack:
    """A stack under ``FORMULARY_AUTH=required`` that remembers every secret it made."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.secrets: list[str] = [stack.http.token or ""]

    def key(self, name: str, scopes: tuple[str, ...] = SCOPES) -> tuple[str, Http]:
        """A new key: its id and an ``Http`` that sends it."""
        client = self.stack.client()
        try:
            made = client.create_key(name, list(scopes))
        finally:
            client.close()
        self.secrets.append(made.secret)
        return made.key.id, Http(self.stack.env.port, token=made.secret)

    def anonymous(self) -> Http:
        return Http(self.stack.env.port)

    def stored(self) -> tuple[int, int]:
        client = self.stack.client()
        try:
            stats = client.stats()
        finally:
            client.close()
        return stats.formulas, stats.published


@pytest.fixture(scope="module")
def keyed() -> Iterator[KeyedStack]:
    # INFO, so that the access lines (which name the key and the worker's pid) are kept.
    with running_stack(FORMULARY_AUTH="required", FORMULARY_LOG_LEVEL="INFO") as stack:
        keyed = KeyedStack(stack)
        yield keyed
        # Whatever ran in this module: no secret in any process's log.
        logs = stack.logs()
        assert all(secret not in logs for secret in keyed.secrets if secret)


def challenge(response: Response) -> str | None:
    return response.header("WWW-Authenticate")


@pytest.mark.processes
def test_every_kind_of_401_over_http_has_its_challenge_and_stores_nothing(keyed) -> None:
    before = keyed.stored()
    revoked_id, revoked = keyed.key("revoked", (SUBMIT,))
    admin_cli(keyed.stack, "key", "revoke", revoked_id)
    cases: list[tuple[Http, dict[str, str], str]] = [
        (keyed.anonymous(), {}, CHALLENGE),
        (keyed.anonymous(), {"Authorization": "Basic dXNlcjpwYXNz"}, CHALLENGE),
        (keyed.anonymous(), {"Authorization": "Bearer not-a-secret"}, INVALID_TOKEN),
        (keyed.anonymous(), bearer(UNKNOWN), INVALID_TOKEN),
        (revoked, {}, INVALID_TOKEN),  # never used before: no worker has it cached
    ]
    for http, headers, expected in cases:
        body = json.dumps(formula("refused")).encode()
        response = http.request(
            "POST", "/formulas", body, {"Content-Type": "application/json", **headers}
        )
        assert (response.status, challenge(response)) == (401, expected), response.body
        assert response.json()["status"] == 401
        assert response.header("Connection") == "close"  # the body was never read
    assert keyed.stored() == before


@pytest.mark.processes
def test_a_missing_scope_is_403_over_http_and_stores_nothing(keyed) -> None:
    _, reader = keyed.key("reader only", (READ,))
    _, submitter = keyed.key("submitter only", (SUBMIT,))
    before = keyed.stored()
    refused = reader.post_json("/formulas", formula("not allowed"))
    assert refused.status == 403 and refused.json()["status"] == 403
    assert challenge(refused) == f'{CHALLENGE}, error="insufficient_scope", scope="submit"'
    assert submitter.get("/formulas").status == 403
    assert submitter.get("/metrics").status == 403
    assert keyed.stored() == before


@pytest.mark.processes
def test_health_and_openapi_are_open_and_unknown_paths_need_a_key(keyed) -> None:
    anonymous = keyed.anonymous()
    assert anonymous.get("/health").status == 200
    assert anonymous.get("/openapi.json").status == 200
    assert anonymous.get("/nowhere").status == 401
    assert anonymous.get("/metrics").status == 401
    assert keyed.stack.http.get("/nowhere").status == 404


@pytest.mark.processes
def test_401_403_and_their_headers_are_answered_as_the_openapi_document_says(keyed) -> None:
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{keyed.stack.env.port}/openapi.json")
    _, metrics_only = keyed.key("metrics only", (METRICS,))
    operations = [
        ("/formulas", "post", {"body": formula("documented")}),
        ("/formulas", "get", {}),
        ("/formulas/{formula_id}", "get", {"path_parameters": {"formula_id": "x" * 22}}),
    ]
    for path, method, case in operations:
        for headers, status in (
            ({}, 401),
            (bearer(UNKNOWN), 401),
            (metrics_only.auth_headers, 403),
        ):
            response = (
                schema[path][method].Case(**case).call_and_validate(headers=headers, checks=CHECKS)
            )
            assert response.status_code == status, (path, method, response.text)


@pytest.mark.processes
def test_a_revoked_key_is_refused_by_both_gunicorn_workers_within_2_seconds(keyed) -> None:
    stack = keyed.stack
    key_id, http = keyed.key("revoked across workers", (READ,))
    sent: list[tuple[str, float, int]] = []  # request id, monotonic time sent, status
    numbers = itertools.count()

    def ask(_: int) -> None:
        request_id = f"revocation-{next(numbers)}"
        at = time.monotonic()
        status = http.request("GET", "/formulas?limit=1", headers={"X-Request-Id": request_id})
        sent.append((request_id, at, status.status))

    # Both workers hold a fresh positive answer for the key (new connection each
    # request: the kernel spreads them over the workers' sockets).
    def both_workers_answered() -> bool:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, range(16)))
        pids = answered_by(stack)
        return len({pids[r] for r, _, s in sent if s == 200 and r in pids}) == 2

    wait_for(both_workers_answered, timeout=30, interval=0, what="both workers to serve the key")
    warm = len(sent)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(16)))  # the last answers cached before the revocation
    admin_cli(stack, "key", "revoke", key_id)
    revoked_at = time.monotonic()
    while time.monotonic() < revoked_at + 3.0:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, range(8)))

    late = [(r, s) for r, at, s in sent[warm:] if at >= revoked_at + 2.0]
    assert late and all(s == 401 for _, s in late), [s for _, s in late]
    pids = wait_for(
        lambda: (found := answered_by(stack)) and all(r in found for r, _ in late) and found,
        what="the access lines of the late requests",
    )
    assert len({pids[r] for r, _ in late}) == 2, "both workers must have refused the key"
    assert {s for _, _, s in sent[warm:]} <= {200, 401}


@pytest.mark.processes
def test_one_idempotency_key_string_from_two_api_keys_is_two_keys(keyed) -> None:
    _, first = keyed.key("tenant one", (SUBMIT,))
    _, second = keyed.key("tenant two", (SUBMIT,))
    one, other = formula("tenant-one"), formula("tenant-two")
    a = first.post_json("/formulas", one, Idempotency_Key="order-42")
    b = second.post_json("/formulas", other, Idempotency_Key="order-42")
    assert (a.status, b.status) == (202, 202)
    assert a.json()["id"] != b.json()["id"]
    again = first.post_json("/formulas", one, Idempotency_Key="order-42")
    assert again.status == 202 and again.header("Idempotent-Replayed") == "true"
    assert again.json() == a.json()
    assert first.post_json("/formulas", other, Idempotency_Key="order-42").status == 422


@pytest.mark.processes
def test_the_access_log_names_the_key_id_and_metrics_count_refusals(keyed) -> None:
    stack = keyed.stack
    key_id, http = keyed.key("observed")
    assert http.get("/formulas").status == 200

    def metrics() -> str:
        response = http.get("/metrics")
        assert response.status == 200
        return response.body.decode()

    before = metrics()
    anonymous = keyed.anonymous()
    for _ in range(3):
        assert anonymous.get("/formulas").status == 401
    assert anonymous.request("GET", "/formulas", headers=bearer(UNKNOWN)).status == 401
    _, reader = keyed.key("observed reader", (READ,))
    assert reader.post_json("/formulas", formula("observed")).status == 403
    after = metrics()
    assert refused(after, 401, "missing") - refused(before, 401, "missing") == 3
    assert refused(after, 401, "invalid") - refused(before, 401, "invalid") == 1
    assert refused(after, 403, "scope") - refused(before, 403, "scope") == 1
    assert by_key(after, key_id, 200) >= 2  # the GET and the first scrape, whichever worker

    wait_for(lambda: f"key_id={key_id} " in stack.api.output(), what="the key id in the log")
    for secret in keyed.secrets:
        assert secret and secret not in stack.logs()


@pytest.mark.processes
def test_refusals_keep_or_cleanly_close_the_connection(keyed) -> None:
    port = keyed.stack.env.port
    _, reader = keyed.key("reader for connections", (READ,))
    refusals = {
        401: {"Authorization": "Bearer not-a-secret"},
        403: reader.auth_headers,
    }
    failures: list[str] = []
    for status, headers in refusals.items():
        session = requests.Session()
        session.headers.update(keyed.stack.auth_headers)
        for n in range(100):
            try:
                refused = session.post(
                    f"http://127.0.0.1:{port}/formulas",
                    json=formula(f"refused-{status}-{n}"),
                    headers=headers,
                    timeout=10,
                )
                assert refused.status_code == status
                assert refused.headers.get("Connection") == "close"  # the body went unread
                after = session.post(
                    f"http://127.0.0.1:{port}/formulas", json=formula(f"ok-{status}-{n}")
                )
                assert after.status_code == 202, after.text[:200]
            except (requests.ConnectionError, AssertionError) as exc:
                failures.append(f"{status}: {exc!r}"[:200])
        session.close()
    assert failures == []


@pytest.mark.processes
def test_5_per_second_over_http_answers_429_with_retry_after_and_stores_nothing() -> None:
    with running_stack(FORMULARY_AUTH="required", FORMULARY_RATE_LIMIT="5/s") as stack:
        http = stack.http
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            answers = list(
                pool.map(lambda n: http.post_json("/formulas", formula(f"limited-{n}")), range(20))
            )
        elapsed = time.monotonic() - started
        statuses = [a.status for a in answers]
        accepted = statuses.count(202)
        assert set(statuses) <= {202, 429}, statuses
        # A burst of 5, then 5 a second.
        assert 5 <= accepted <= 5 + 5 * elapsed + 1, (accepted, elapsed)
        for answer in answers:
            if answer.status == 429:
                assert answer.header("Retry-After") == "1"
                assert answer.json()["status"] == 429
        client = stack.client()
        wait_for(lambda: client.stats().formulas == accepted, what="only the 202s stored")
        # Another key has its own bucket; /health is never limited.
        other = client.create_key("other", [READ]).secret
        client.close()
        assert Http(stack.env.port, token=other).get("/formulas").status == 200
        assert all(Http(stack.env.port).get("/health").status == 200 for _ in range(10))
        # The bucket refills by the clock: a refused retry spends nothing.
        wait_for(
            lambda: http.post_json("/formulas", formula("after the wait")).status == 202,
            timeout=5,
            what="a token back",
        )


def stack_script() -> Any:
    """``scripts/stack.py`` (``./scripts/up``) as a module."""
    spec = importlib.util.spec_from_file_location("stack_script", ROOT / "scripts" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.processes
def test_up_makes_a_local_key_once_keeps_it_0600_and_replaces_one_the_broker_lost(
    tmp_path, capsys
) -> None:
    script = stack_script()
    path = tmp_path / "var" / "api-key"
    with running_stack(FORMULARY_AUTH="required") as stack:
        settings = stack.env.settings()
        script.ensure_api_key(settings, path)
        secret = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        client = stack.client()
        [local] = [k for k in client.list_keys() if k.name == "local"]
        assert set(local.scopes) == set(SCOPES)
        assert Http(stack.env.port, token=secret).get("/metrics").status == 200
        printed = capsys.readouterr().out + script.usage(settings, local, path)
        assert f'curl -H "Authorization: Bearer $(cat {path})"' in printed
        assert secret not in printed

        script.ensure_api_key(settings, path)  # the next start: the same key
        assert path.read_text().strip() == secret
        assert [k.name for k in client.list_keys()].count("local") == 1

        client.revoke_key(local.id)  # or another broker, or :memory: restarted
        script.ensure_api_key(settings, path)
        replaced = path.read_text().strip()
        assert replaced != secret and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert Http(stack.env.port, token=replaced).get("/formulas").status == 200
        client.close()
        assert secret not in stack.logs() and replaced not in stack.logs()
