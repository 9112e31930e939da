"""``/metrics``: Prometheus text for the API's own requests and the broker's figures.

Two sources meet at scrape time:

- the API's metrics (request counts, latencies, refused bodies), defined here
  once per process and recorded by ``api.middleware.RequestLog``. Under
  gunicorn every worker writes them to files in ``PROMETHEUS_MULTIPROC_DIR``
  (set up by ``gunicorn.conf.py``) and a scrape merges all the workers' files,
  so the totals are the same whichever worker answers. Without that directory
  (tests, a single process) they live in prometheus_client's default registry.
- the broker's gauges and counters, read by one ``broker.stats()`` call per
  scrape. They belong to the broker, not to a worker, so they are collected
  into the scrape's own registry only and never written to the shared files
  (where every worker would add its copy). When the broker does not answer,
  the scrape still succeeds with ``formulary_broker_up 0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import fields

import falcon
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.auth import REFUSALS
from broker.errors import BrokerUnavailable
from broker.interface import BrokerStats, SubmissionBroker

NAMESPACE = "formulary"

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
    namespace=NAMESPACE,
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from reading the request to having the response, by method and route template.",
    ["method", "route"],
    namespace=NAMESPACE,
)
REJECTED_BODIES = Counter(
    "rejected_bodies",
    "POST /formulas refused before reaching the broker (400, 413, 415), by reason.",
    ["reason"],
    namespace=NAMESPACE,
)
# The status of a POST /formulas refusal, and the reason it is counted under.
REJECTION_REASONS = {400: "validation", 413: "body_too_large", 415: "unsupported_media_type"}
for _reason in REJECTION_REASONS.values():
    REJECTED_BODIES.labels(_reason)  # exported as 0 from the start, not only after one
AUTH_REFUSED = Counter(
    "auth_refused",
    "Requests refused by api.auth, by status (401, 403, 429) and reason: missing (no bearer "
    "token), malformed, invalid (unknown or revoked key), scope, rate_limited.",
    ["status", "reason"],
    namespace=NAMESPACE,
)
for _reason, _status in REFUSALS.items():
    AUTH_REFUSED.labels(str(_status), _reason)
KEY_REQUESTS = Counter(
    "api_key_requests",
    "Requests made with a valid API key, by the key's id (never its secret) and status.",
    ["key_id", "status"],
    namespace=NAMESPACE,
)


class BrokerCollector(Collector):
    """The broker's ``stats()`` as metrics, read when scraped (one broker call)."""

    def __init__(self, broker: SubmissionBroker) -> None:
        self._broker = broker

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._broker.stats()
        except BrokerUnavailable:
            yield _up(0)
            return
        yield _up(1)
        yield from _broker_metrics(stats)


def _up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        f"{NAMESPACE}_broker_up", "1 when the broker answered this scrape, else 0.", value=value
    )


def _broker_metrics(stats: BrokerStats) -> Iterator[Metric]:
    # Each BrokerStats field names its metric, kind and help; counters get
    # "_total" when written.
    for field in fields(stats):
        family = _FAMILIES[field.metadata["kind"]]
        name, text = field.metadata["metric"], field.metadata["help"]
        yield family(f"{NAMESPACE}_{name}", text, value=getattr(stats, field.name))


_FAMILIES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


def multiprocess_dir() -> str | None:
    # gunicorn.conf.py exports this before the fork, and prometheus_client
    # reads the same variable when first imported to decide where this
    # process's values live; our choice of registry must agree with it.
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def scrape_registry(broker: SubmissionBroker) -> CollectorRegistry:
    """A registry for one scrape: every worker's API metrics and the broker's."""
    registry = CollectorRegistry()
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)
    registry.register(BrokerCollector(broker))
    return registry


class MetricsResource:
    def __init__(self, broker: SubmissionBroker) -> None:
        self._broker = broker

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        encode, content_type = choose_encoder(req.get_header("Accept") or "")
        resp.content_type = content_type
        resp.data = encode(scrape_registry(self._broker))
