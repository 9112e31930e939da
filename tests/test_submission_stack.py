"""The submission path with the real processes: broker, gunicorn, HTTP."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import SUMMER, Stack, admin_cli, running_stack, wait_for

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as stack:
        yield stack


def formula(tag: str) -> dict[str, object]:
    return {"name": tag, "materials": [{"name": f"Material {tag}", "concentration": 1}]}


def test_a_new_make_up_is_202_and_the_same_make_up_reordered_and_renamed_is_409(stack) -> None:
    created = stack.http.post_json("/formulas", SUMMER)
    assert created.status == 202
    body = created.json()
    assert created.header("Location") == f"/formulas/{body['id']}"
    twin = {
        "name": "Another Name",
        "materials": [
            {"name": "sandalwood", "concentration": 5.20},
            {"name": "  LAVENDER   absolute ", "concentration": 1e1},
            {"name": "Bergamot Oil", "concentration": 15.50},
        ],
    }
    duplicate = stack.http.post_json("/formulas", twin)
    assert duplicate.status == 409
    assert duplicate.json()["existing_id"] == body["id"]
    assert duplicate.header("Location") == f"/formulas/{body['id']}"
    assert stack.http.get(f"/formulas/{body['id']}").json()["name"] == "Summer Breeze"


def test_64_concurrent_identical_posts_store_one_formula_and_publish_one_message(stack) -> None:
    before = stack.client().stats()
    body = formula("concurrent")
    with ThreadPoolExecutor(64) as pool:
        statuses = list(
            pool.map(lambda _: stack.http.post_json("/formulas", body).status, range(64))
        )
    assert statuses.count(202) == 1 and statuses.count(409) == 63
    after = stack.client().stats()
    assert after.formulas - before.formulas == 1
    assert after.published - before.published == 1


BAD_INPUTS = [
    # (what, body, headers, status, corrected body)
    ("invalid json", b'{"name": "bad-1", "materials": [', {}, 400, formula("bad-1")),
    (
        "NaN",
        b'{"name": "bad-2", "materials": [{"name": "Material bad-2", "concentration": NaN}]}',
        {},
        400,
        formula("bad-2"),
    ),
    (
        "string number",
        b'{"name": "bad-3", "materials": [{"name": "Material bad-3", "concentration": "1"}]}',
        {},
        400,
        formula("bad-3"),
    ),
    (
        "over 100",
        b'{"name": "bad-4", "materials": [{"name": "Material bad-4", "concentration": 100.5}]}',
        {},
        400,
        formula("bad-4"),
    ),
    (
        "unknown key",
        b'{"name": "bad-5", "x": 1, "materials": [{"name": "Material bad-5", "concentration": 1}]}',
        {},
        400,
        formula("bad-5"),
    ),
    (
        "wrong media type",
        json.dumps(formula("bad-6")).encode(),
        {"Content-Type": "text/plain"},
        415,
        formula("bad-6"),
    ),
    (
        "too large",
        json.dumps(formula("bad-7")).encode()[:-1] + b" " * 70_000 + b"}",
        {},
        413,
        formula("bad-7"),
    ),
    (
        "bad idempotency key",
        json.dumps(formula("bad-8")).encode(),
        {"Idempotency-Key": ""},
        400,
        formula("bad-8"),
    ),
]


@pytest.mark.parametrize(
    ("what", "body", "headers", "status", "corrected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_refused_stores_nothing_and_its_corrected_twin_is_accepted(
    stack, what, body, headers, status, corrected
) -> None:
    before = stack.client().stats()
    hdrs = {"Content-Type": "application/json", **headers}
    refused = stack.http.request("POST", "/formulas", body, hdrs)
    assert refused.status == status
    assert refused.header("Content-Type") == "application/problem+json"
    assert refused.json()["status"] == status
    after = stack.client().stats()
    assert (after.formulas, after.published) == (before.formulas, before.published)
    assert stack.http.post_json("/formulas", corrected).status == 202


def test_a_dead_broker_means_503_and_a_restarted_one_is_used_without_restarting_gunicorn() -> None:
    with running_stack() as stack:
        assert stack.http.post_json("/formulas", formula("before")).status == 202
        stack.broker.kill()
        down = stack.http.post_json("/formulas", formula("during"))
        assert down.status == 503 and down.header("Retry-After")
        health = stack.http.get("/health")
        assert health.status == 503 and health.header("Retry-After")
        assert stack.http.get("/formulas").status == 503
        api_pid = stack.api.pid
        stack.start_broker()
        wait_for(lambda: stack.http.get("/health").status == 200, what="the API to reconnect")
        # Every gunicorn worker thread, not just the first to answer, works again:
        # reads retry on a fresh connection, writes only fail if they may have been sent.
        with ThreadPoolExecutor(8) as pool:
            reads = list(pool.map(lambda _: stack.http.get("/formulas").status, range(48)))
        assert reads == [200] * 48
        writes = [
            stack.http.post_json("/formulas", formula(f"after-{i}")).status for i in range(24)
        ]
        assert writes == [202] * 24
        assert stack.api.pid == api_pid and stack.api.alive()


def test_the_admin_socket_of_the_real_broker_is_owner_only_and_answers_the_cli(stack) -> None:
    mode = stat.S_IMODE(os.stat(stack.env.admin_socket).st_mode)
    assert mode == 0o600
    created = stack.http.post_json("/formulas", formula("admin-show")).json()
    assert admin_cli(stack, "show", created["id"])["formula"]["id"] == created["id"]
    stats = subprocess.run(
        [sys.executable, "-m", "broker.admin", "stats"],
        env=stack.env.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert stats.returncode == 0 and "formulas" in stats.stdout
