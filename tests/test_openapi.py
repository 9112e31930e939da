"""``/openapi.json``: a valid OpenAPI 3.1 document that the live server keeps to.

The document is checked on its own (openapi-spec-validator), against the
app's routes, and then schemathesis sends generated requests, valid and
invalid, to the real gunicorn + broker and checks every response against it:
no 5xx, and status, media type, headers and body all as documented.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import falcon.inspect
import falcon.testing
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import openapi
from api.app import create_app
from broker.engines.embedded import EmbeddedBroker
from broker.settings import Settings
from tests.support import Stack, running_stack

AUTH_OFF = Settings(auth="off")  # tests/test_auth.py builds apps with keys

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def document(broker: EmbeddedBroker) -> dict[str, Any]:
    result = falcon.testing.TestClient(create_app(broker, AUTH_OFF)).simulate_get("/openapi.json")
    assert result.status_code == 200
    assert result.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = result.json
    return body


def test_the_document_is_valid_openapi_3_1(document) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_and_method_the_app_serves_is_documented_and_no_other(broker, document) -> None:
    served = {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(create_app(broker, AUTH_OFF))
        for method in route.methods
        if not method.internal
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert documented == served


def test_every_response_documents_x_request_id(document) -> None:
    components = document["components"]["responses"]
    for item in document["paths"].values():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for answer in operation["responses"].values():
                if "$ref" in answer:
                    answer = components[answer["$ref"].rsplit("/", 1)[1]]
                assert "X-Request-Id" in answer["headers"], (method, answer["description"])


def test_the_409_documents_existing_id_fingerprint_and_location(document) -> None:
    conflict = document["paths"]["/formulas"]["post"]["responses"]["409"]
    assert set(conflict["headers"]) >= {"Location", "X-Request-Id"}
    assert "application/problem+json" in conflict["content"]
    extension = document["components"]["schemas"]["DuplicateProblem"]["allOf"][1]
    assert set(extension["required"]) == {"existing_id", "fingerprint"}


# -- schemathesis against the live API ---------------------------------------------


def generated_cases() -> Iterator[tuple[str, str, GenerationMode]]:
    """Valid requests for every operation; invalid ones where there is input to get wrong."""
    for path, item in openapi.document()["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            yield path, method, GenerationMode.POSITIVE
            if "requestBody" in operation or operation.get("parameters"):
                yield path, method, GenerationMode.NEGATIVE


CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CHECKS = [not_a_server_error, *CONFORMANCE]
JSON = "application/json"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as stack:
        yield stack


def served_schema(stack: Stack) -> Any:
    """The document as the running server serves it; cases go to that server."""
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{stack.env.port}/openapi.json")


@pytest.fixture(scope="module")
def live_schema(stack: Stack) -> Any:
    return served_schema(stack)


@pytest.mark.processes
@pytest.mark.parametrize(("path", "method", "mode"), list(generated_cases()))
def test_generated_requests_get_documented_answers_and_no_server_error(
    stack, live_schema, path, method, mode
) -> None:
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        # With the stack's key (none with FORMULARY_TEST_AUTH=off): the cases get past
        # authentication to the operation itself; tests/test_auth.py checks the refusals.
        case.call_and_validate(headers=stack.auth_headers, checks=CHECKS)

    answers_as_documented()


# Not the document's example: generated cases may have stored that one already.
SUMMER = {
    "name": "Summer Evening",
    "materials": [
        {"name": "Bergamot Oil", "concentration": 15.25},
        {"name": "Lavender Absolute", "concentration": 10.0},
        {"name": "Sandalwood", "concentration": 5.2},
    ],
}
TWIN = {
    "name": "Twin",
    "materials": [
        {"name": "sandalwood", "concentration": 5.20},
        {"name": "Bergamot Oil", "concentration": 15.250},
        {"name": "LAVENDER absolute", "concentration": 1e1},
    ],
}
OTHER = {"name": "Other", "materials": [{"name": "Musk", "concentration": 1}]}


def answer_with_key(
    live_schema: Any,
    path: str,
    method: str,
    status: int | tuple[int, ...],
    checks: Any = CHECKS,
    auth: dict[str, str] | None = None,
    **case: Any,
) -> Any:
    """Send one request as a schemathesis case; its answer must be documented and valid."""
    operation = live_schema[path][method]
    response = operation.Case(**case).call_and_validate(headers=auth, checks=checks)
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    return response


@pytest.mark.processes
def test_every_documented_answer_the_live_api_gives_matches_its_schema(stack, live_schema) -> None:
    answer = partial(answer_with_key, auth=stack.auth_headers)
    key = {"Idempotency-Key": "openapi-1"}
    created = answer(live_schema, "/formulas", "post", 202, body=SUMMER, headers=key).json()
    replayed = answer(live_schema, "/formulas", "post", 202, body=SUMMER, headers=key)
    assert replayed.headers["idempotent-replayed"] == ["true"]  # schemathesis lists values
    answer(live_schema, "/formulas", "post", 409, body=TWIN)
    answer(live_schema, "/formulas", "post", 422, body=OTHER, headers=key)
    answer(live_schema, "/formulas", "post", 400, body={"name": "x"})
    answer(live_schema, "/formulas", "post", 400, body=OTHER, headers={"Idempotency-Key": '""'})
    answer(live_schema, "/formulas", "post", (202, 409), body=OTHER)  # a second page's worth

    page = answer(live_schema, "/formulas", "get", 200, query={"limit": 1}).json()
    assert page["items"] and page["next"]
    answer(live_schema, "/formulas", "get", 200, query={"limit": 1, "cursor": page["next"]})
    answer(live_schema, "/formulas", "get", 400, query={"cursor": "bogus"})
    one = {"formula_id": created["id"]}
    answer(live_schema, "/formulas/{formula_id}", "get", 200, path_parameters=one)
    unknown = {"formula_id": "no-such-formula-id"}
    answer(live_schema, "/formulas/{formula_id}", "get", 404, path_parameters=unknown)
    answer(live_schema, "/health", "get", 200)
    answer(live_schema, "/metrics", "get", 200)
    answer(live_schema, "/openapi.json", "get", 200)


@pytest.mark.processes
def test_refused_media_types_and_sizes_are_answered_as_documented(stack, live_schema) -> None:
    # Sent with requests (which schemathesis sends its own cases with): a case
    # would serialize its body as JSON, and these bodies must not be.
    url = f"http://127.0.0.1:{stack.env.port}/formulas"
    case = live_schema["/formulas"]["post"].Case(body=OTHER)
    key = stack.auth_headers
    too_large = requests.post(url, data=b" " * 65_537, headers={"Content-Type": JSON, **key})
    not_json = requests.post(url, data=b"{}", headers={"Content-Type": "text/plain", **key})
    for response, status in ((too_large, 413), (not_json, 415)):
        assert response.status_code == status
        case.validate_response(response, checks=CHECKS)


@pytest.mark.processes
def test_a_broker_outage_is_answered_as_documented() -> None:
    with running_stack() as stack:
        schema = served_schema(stack)
        answer = partial(answer_with_key, auth=stack.auth_headers)
        stack.broker.stop()
        for path, method, case in [
            ("/formulas", "post", {"body": OTHER}),
            ("/formulas", "get", {}),
            ("/formulas/{formula_id}", "get", {"path_parameters": {"formula_id": "x" * 22}}),
            ("/health", "get", {}),
        ]:
            response = answer(schema, path, method, 503, CONFORMANCE, **case)
            assert response.headers["retry-after"][0].isdigit()
        # Under FORMULARY_AUTH=required the scrape's key is checked by the broker too:
        # 503 like the rest, unless a gunicorn worker checked that key in the last second.
        metrics = answer(schema, "/metrics", "get", (200, 503), CONFORMANCE)
        if metrics.status_code == 200:
            assert "formulary_broker_up 0.0" in metrics.text
        else:
            assert stack.auth_headers and metrics.headers["retry-after"][0].isdigit()
