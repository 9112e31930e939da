"""``/metrics``, request ids and access lines: in process, then with the real processes.

In process, the API's metrics live in prometheus_client's default registry,
which every test in this process shares, so those are compared before and
after; the broker is new for each test, so its figures are compared as they
are. With the real processes, gunicorn runs two workers in multiprocess mode
and every scrape must show the totals of both, whichever worker answers it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import falcon
import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.middleware import logfmt
from broker.engines.embedded import EmbeddedBroker
from broker.errors import BrokerUnavailable
from broker.settings import Settings
from tests.support import SUMMER, Stack, answered_by, running_stack, wait_for

AUTH_OFF = Settings(auth="off")  # tests/test_auth.py builds apps with keys

TWIN = {
    "name": "Winter",
    "materials": [
        {"name": " sandalwood ", "concentration": 5.20},
        {"name": "LAVENDER  absolute", "concentration": 1e1},
        {"name": "Bergamot Oil", "concentration": 15.5},
    ],
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    """Every sample of a Prometheus text, parsed by prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, method: str, route: str, status: int) -> float:
    return value(
        samples, "formulary_http_requests_total", method=method, route=route, status=str(status)
    )


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 1}]}


# -- in process ---------------------------------------------------------------------


@pytest.fixture
def client(broker: EmbeddedBroker) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(broker, AUTH_OFF))


def post(client: falcon.testing.TestClient, body: Any, **headers: str) -> falcon.testing.Result:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    hdrs = {"Content-Type": "application/json", **headers}
    return client.simulate_post("/formulas", body=data, headers=hdrs)


def scrape(client: falcon.testing.TestClient) -> Samples:
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["Content-Type"].startswith("text/plain")
    return samples_of(result.text)


def test_a_202_a_409_and_each_refusal_move_their_counters_by_exactly_one(client) -> None:
    before = scrape(client)
    assert post(client, SUMMER).status_code == 202
    assert post(client, TWIN).status_code == 409
    assert post(client, {"name": "", "materials": []}).status_code == 400
    assert post(client, b"x" * 65_537).status_code == 413
    assert post(client, SUMMER, **{"Content-Type": "text/plain"}).status_code == 415
    after = scrape(client)

    for status in (202, 409, 400, 413, 415):
        moved = requests(after, "POST", "/formulas", status) - requests(
            before, "POST", "/formulas", status
        )
        assert moved == 1, status
    for reason in ("validation", "body_too_large", "unsupported_media_type"):
        name = "formulary_rejected_bodies_total"
        assert value(after, name, reason=reason) - value(before, name, reason=reason) == 1
    assert value(after, "formulary_broker_up") == 1
    assert value(after, "formulary_broker_submitted_total") == 1
    assert value(after, "formulary_broker_duplicates_total") == 1
    assert value(after, "formulary_broker_published_total") == 1
    assert value(after, "formulary_broker_formulas") == 1
    assert value(after, "formulary_broker_queue_depth") == 1
    # The first scrape is counted once it has answered, so the second sees it.
    assert requests(after, "GET", "/metrics", 200) - requests(before, "GET", "/metrics", 200) == 1


def test_a_processed_message_moves_delivered_acked_and_processed(client, broker) -> None:
    assert post(client, SUMMER).status_code == 202
    (delivery,) = broker.receive("consumer-1")
    assert value(scrape(client), "formulary_broker_in_flight") == 1
    assert broker.complete(delivery.receipt, {"material_count": 3})
    samples = scrape(client)
    assert value(samples, "formulary_broker_delivered_total") == 1
    assert value(samples, "formulary_broker_acked_total") == 1
    assert value(samples, "formulary_broker_processed_total") == 1
    assert value(samples, "formulary_broker_redelivered_total") == 0
    assert value(samples, "formulary_broker_in_flight") == 0
    assert value(samples, "formulary_broker_queue_depth") == 0


def test_requests_are_labelled_by_route_template_never_by_raw_path(client) -> None:
    before = scrape(client)
    for formula_id in ("first-unknown-id", "second-unknown-id"):
        assert client.simulate_get(f"/formulas/{formula_id}").status_code == 404
    assert client.simulate_get("/no/such/path").status_code == 404
    response = client.simulate_get("/metrics")
    after = samples_of(response.text)

    route = "/formulas/{formula_id}"
    assert requests(after, "GET", route, 404) - requests(before, "GET", route, 404) == 2
    assert requests(after, "GET", "unmatched", 404) - requests(before, "GET", "unmatched", 404) == 1
    name = "formulary_http_request_duration_seconds_count"
    assert (
        value(after, name, method="GET", route=route)
        - value(before, name, method="GET", route=route)
        == 2
    )
    assert "unknown-id" not in response.text and "/no/such/path" not in response.text


def test_the_text_parses_with_counters_and_gauges_typed_as_such(client) -> None:
    post(client, SUMMER)
    families = {f.name: f for f in text_string_to_metric_families(scrape_text(client))}
    assert families["formulary_http_requests"].type == "counter"
    assert families["formulary_http_request_duration_seconds"].type == "histogram"
    assert families["formulary_rejected_bodies"].type == "counter"
    assert families["formulary_broker_submitted"].type == "counter"
    assert families["formulary_broker_queue_depth"].type == "gauge"
    assert families["formulary_broker_up"].type == "gauge"


def scrape_text(client: falcon.testing.TestClient) -> str:
    return client.simulate_get("/metrics").text


def test_openmetrics_is_answered_when_the_scraper_asks_for_it(client) -> None:
    result = client.simulate_get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert result.headers["Content-Type"].startswith("application/openmetrics-text")
    assert result.text.rstrip().endswith("# EOF")


class Unreachable:
    """A broker that is never there."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise BrokerUnavailable("connection refused")

        return call


def test_metrics_still_answer_when_the_broker_does_not_with_broker_up_0() -> None:
    client = falcon.testing.TestClient(create_app(Unreachable(), AUTH_OFF))  # type: ignore[arg-type]
    assert client.simulate_get("/health").status_code == 503
    samples = scrape(client)
    assert value(samples, "formulary_broker_up") == 0
    assert ("formulary_broker_submitted_total", frozenset()) not in samples
    assert requests(samples, "GET", "/health", 503) >= 1


# -- request ids and access lines -------------------------------------------------


def test_a_well_formed_request_id_is_echoed(client) -> None:
    result = client.simulate_get("/health", headers={"X-Request-Id": "trace 42/abc-DEF"})
    assert result.headers["X-Request-Id"] == "trace 42/abc-DEF"


@pytest.mark.parametrize("incoming", [None, "", "x" * 129, "tab\there"])
def test_a_missing_or_malformed_request_id_is_replaced_by_a_new_one(client, incoming) -> None:
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    first = client.simulate_get("/health", headers=headers).headers["X-Request-Id"]
    second = client.simulate_get("/health", headers=headers).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_error_responses_carry_a_request_id_too(client) -> None:
    assert client.simulate_get("/nowhere").headers["X-Request-Id"]
    assert client.simulate_delete("/formulas").headers["X-Request-Id"]
    assert post(client, b"{").headers["X-Request-Id"]


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "api.access"]


def test_each_request_writes_one_access_line_with_its_fields(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="api.access")
    result = post(client, SUMMER, **{"X-Request-Id": "req-1"})
    (record,) = access_records(caplog)
    fields: Mapping[str, Any] = record.access  # type: ignore[attr-defined]
    assert fields["method"] == "POST" and fields["path"] == "/formulas"
    assert fields["route"] == "/formulas" and fields["status"] == result.status_code == 202
    assert fields["request_id"] == "req-1" and fields["duration_ms"] >= 0
    assert record.getMessage().startswith("method=POST path=/formulas route=/formulas status=202 ")
    assert record.getMessage().endswith(" request_id=req-1")


def test_a_404_and_a_405_are_logged_once_each_with_their_route(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="api.access")
    client.simulate_get("/formulas/some-id/extra")
    client.simulate_put("/health")
    first, second = (r.access for r in access_records(caplog))  # type: ignore[attr-defined]
    assert (first["status"], first["route"], first["path"]) == (
        404,
        "unmatched",
        "/formulas/some-id/extra",
    )
    assert (second["status"], second["route"]) == (405, "/health")


def test_access_values_with_spaces_or_quotes_are_quoted() -> None:
    line = logfmt({"path": '/a b"c', "status": 404, "request_id": ""})
    assert line == 'path="/a b\\"c" status=404 request_id=""'


# -- with the real processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # INFO, so that access lines (with each worker's pid) reach the api log.
    with running_stack(FORMULARY_LOG_LEVEL="INFO") as stack:
        stack.start_worker()
        yield stack


@pytest.mark.processes
def test_request_counts_are_summed_over_both_workers_whichever_answers_the_scrape(stack) -> None:
    created: list[str] = []

    def submit_batch() -> bool:
        start = len(created)
        tags = [f"spread-{n}" for n in range(start, start + 16)]
        with ThreadPoolExecutor(16) as pool:
            statuses = list(
                pool.map(
                    lambda tag: stack.http.post_json("/formulas", formula(tag), X_Request_Id=tag),
                    tags,
                )
            )
        assert statuses and all(r.status == 202 for r in statuses)
        created.extend(tags)
        pids = answered_by(stack)
        return len({pids[tag] for tag in created if tag in pids}) == 2

    wait_for(submit_batch, timeout=30, interval=0, what="both gunicorn workers to take submits")

    scrapes: dict[int, list[float]] = {}

    def scrape_both_workers() -> bool:
        request_id = f"scrape-{sum(len(v) for v in scrapes.values())}"
        response = stack.http.request("GET", "/metrics", headers={"X-Request-Id": request_id})
        assert response.status == 200
        total = requests(samples_of(response.body.decode()), "POST", "/formulas", 202)
        pid = wait_for(lambda: answered_by(stack).get(request_id), what="the scrape's access line")
        scrapes.setdefault(pid, []).append(total)
        return len(scrapes) == 2 and all(len(v) >= 3 for v in scrapes.values())

    wait_for(scrape_both_workers, timeout=30, interval=0, what="both workers to answer scrapes")
    assert {total for totals in scrapes.values() for total in totals} == {len(created)}


@pytest.mark.processes
def test_broker_counters_move_by_the_right_amounts_with_two_workers_running(stack) -> None:
    def metrics() -> Samples:
        response = stack.http.get("/metrics")
        assert response.status == 200
        return samples_of(response.body.decode())

    def settled() -> Samples | None:
        samples = metrics()
        done = value(samples, "formulary_broker_processed_total") == value(
            samples, "formulary_broker_submitted_total"
        )
        return samples if done and value(samples, "formulary_broker_in_flight") == 0 else None

    before = wait_for(settled, timeout=30, what="the worker to process earlier submits")
    assert stack.http.post_json("/formulas", formula("counted")).status == 202
    assert stack.http.post_json("/formulas", formula("counted")).status == 409
    assert stack.http.post_json("/formulas", {"name": "counted"}).status == 400
    after = wait_for(settled, timeout=30, what="the worker to process the new formula")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "formulary_broker_up") == 1
    assert moved("formulary_broker_submitted_total") == 1
    assert moved("formulary_broker_duplicates_total") == 1
    assert moved("formulary_broker_published_total") == 1
    assert moved("formulary_broker_delivered_total") == 1
    assert moved("formulary_broker_acked_total") == 1
    assert moved("formulary_broker_processed_total") == 1
    assert moved("formulary_rejected_bodies_total", reason="validation") == 1
    for status in (202, 409, 400):
        assert (
            moved(
                "formulary_http_requests_total",
                method="POST",
                route="/formulas",
                status=str(status),
            )
            == 1
        )
    assert value(after, "formulary_broker_queue_depth") == 0
