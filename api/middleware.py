"""One middleware for what every request leaves behind: an id, a log line, metrics.

``RequestLog`` gives each request an id (a well-formed incoming ``X-Request-Id``
is kept, anything else is replaced by a fresh one) and echoes it in the
response. When the response is ready it writes one ``api.access`` line in
logfmt (``method=GET path=/formulas route=/formulas status=200
duration_ms=1.234 key_id=... request_id=...``) and records the request in the
metrics of ``api.metrics``. Metrics are labelled by route template, never by
raw path, so their number of series stays bounded whatever clients send.

With ``FORMULARY_AUTH=required`` the line names the API key by its id
(``key_id``, once ``api.auth`` has accepted it) or says why ``api.auth``
refused the request (``refused=missing``...); the secret itself never
reaches this module. Per-key metrics use only accepted keys' ids, which
operators create, so those series stay bounded too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import falcon

from api import metrics
from api.auth import caller, refusal

log = logging.getLogger("api.access")

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LENGTH = 128
UNMATCHED_ROUTE = "unmatched"
OTHER_METHOD = "other"

_SUBMIT = ("POST", "/formulas")


class RequestLog:
    """Falcon middleware: request id, one access log line and metrics per request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        req.context.request_id = request_id(req.get_header(REQUEST_ID_HEADER))

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        seconds = time.perf_counter() - req.context.started
        request_id: str = req.context.request_id
        resp.set_header(REQUEST_ID_HEADER, request_id)
        method = req.method if req.method in falcon.COMBINED_METHODS else OTHER_METHOD
        route = req.uri_template or UNMATCHED_ROUTE
        status = resp.status_code

        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_DURATION.labels(method, route).observe(seconds)
        if (method, route) == _SUBMIT and status in metrics.REJECTION_REASONS:
            metrics.REJECTED_BODIES.labels(metrics.REJECTION_REASONS[status]).inc()
        key_id, refused = caller(req), refusal(req)
        if key_id:
            metrics.KEY_REQUESTS.labels(key_id, str(status)).inc()
        if refused is not None:
            metrics.AUTH_REFUSED.labels(str(status), refused).inc()

        if log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "method": req.method,
                "path": req.path,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            }
            if key_id:
                fields["key_id"] = key_id
            if refused is not None:
                fields["refused"] = refused
            fields["request_id"] = request_id
            log.info(logfmt(fields), extra={"access": fields})


def request_id(incoming: str | None) -> str:
    """The client's id when it is 1-128 printable ASCII characters, else a new one."""
    if (
        incoming
        and len(incoming) <= MAX_REQUEST_ID_LENGTH
        and all(" " <= ch <= "~" for ch in incoming)
    ):
        return incoming
    return uuid.uuid4().hex


def logfmt(fields: dict[str, Any]) -> str:
    """``key=value`` pairs; a value with spaces, quotes or ``=`` is quoted and escaped."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


# Printable ASCII but space, '"', '=' and '\\': written as it is (the usual case).
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")


def _logfmt_value(value: Any) -> str:
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    if text and text.isprintable() and not any(ch in text for ch in ' "=\\'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in escaped)
    return f'"{escaped}"'
