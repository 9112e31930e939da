"""RFC 9457 problem details, and the one place domain errors become HTTP.

``register(app)`` installs an error handler per domain error and a serializer
that renders Falcon's own errors (404, 405, 413...) as problem details too.
Nothing here leaks a traceback: unexpected errors are logged with theirs and
answered with a plain 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import falcon

from api.representation import dumps, formula_location
from broker.errors import (
    BrokerUnavailable,
    DuplicateFormula,
    FieldError,
    FormulaNotFound,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidFormula,
    QueueFull,
    StorageFailed,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = "2"
_TYPE_PREFIX = "urn:formulary:problem:"
_DEFAULT_DETAIL = {
    404: "There is nothing at this path.",
    405: "This path does not support this method; Allow lists those it does.",
}


class Problem(falcon.HTTPError):
    """An HTTP error with a problem-details body (``type`` slug and extensions)."""

    def __init__(
        self,
        status: int,
        slug: str | None,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(
            status, title=HTTPStatus(status).phrase, description=detail, headers=headers
        )
        self.slug = slug
        self.extensions = extensions


def invalid(errors: Iterable[FieldError], detail: str = "The request is not valid.") -> Problem:
    return Problem(
        400,
        "validation",
        detail,
        errors=[{"field": e.field, "message": e.message} for e in errors],
    )


def document(exception: falcon.HTTPError) -> dict[str, Any]:
    status = exception.status_code
    slug = getattr(exception, "slug", None)
    phrase = HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": _TYPE_PREFIX + slug if slug else "about:blank",
        # Falcon's own titles read "404 Not Found"; RFC 9457 wants the phrase.
        "title": phrase,
        "status": status,
        "detail": exception.description or _DEFAULT_DETAIL.get(status, phrase),
    }
    body.update(getattr(exception, "extensions", {}))
    return body


def serialize(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    resp.content_type = PROBLEM_JSON
    resp.data = dumps(document(exception))


def register(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    app.set_error_serializer(serialize)
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(InvalidFormula, _invalid_formula)
    app.add_error_handler(DuplicateFormula, _duplicate)
    app.add_error_handler(QueueFull, _queue_full)
    app.add_error_handler(BrokerUnavailable, _unavailable)
    app.add_error_handler(StorageFailed, _storage_failed)
    app.add_error_handler(FormulaNotFound, _not_found)
    app.add_error_handler(InvalidCursor, _invalid_cursor)
    app.add_error_handler(IdempotencyKeyReused, _key_reused)


def _http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
) -> None:
    # Falcon's default handler would honour Accept and might pick XML; we
    # always answer problem+json.
    resp.status = ex.status
    if ex.headers:
        resp.set_headers(ex.headers)
    serialize(req, resp, ex)


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    if isinstance(ex, falcon.HTTPError):
        _http_error(req, resp, ex, params)
        return
    log.exception("unexpected error on %s %s", req.method, req.path)
    _http_error(req, resp, Problem(500, None, "The server could not handle this request."), params)


def _invalid_formula(
    req: falcon.Request, resp: falcon.Response, ex: InvalidFormula, params: Any
) -> None:
    raise invalid(ex.errors, "The formula is not valid; every problem is listed in errors.")


def _duplicate(
    req: falcon.Request, resp: falcon.Response, ex: DuplicateFormula, params: Any
) -> None:
    headers = {"Location": formula_location(ex.existing_id)}
    if ex.replayed:
        headers["Idempotent-Replayed"] = "true"
    raise Problem(
        409,
        "duplicate-formula",
        "A formula with the same make-up is already stored.",
        headers=headers,
        existing_id=ex.existing_id,
        fingerprint=ex.fingerprint,
    )


def _queue_full(req: falcon.Request, resp: falcon.Response, ex: QueueFull, params: Any) -> None:
    raise Problem(
        503,
        "queue-full",
        f"The queue holds its capacity of {ex.capacity} messages; nothing was stored. Retry later.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def _unavailable(
    req: falcon.Request, resp: falcon.Response, ex: BrokerUnavailable, params: Any
) -> None:
    log.warning("broker unavailable: %s", ex.reason)
    raise Problem(
        503,
        "broker-unavailable",
        "The broker cannot be reached right now. Retry later.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def _storage_failed(
    req: falcon.Request, resp: falcon.Response, ex: StorageFailed, params: Any
) -> None:
    log.error("broker could not store a change: %s", ex.reason)
    raise Problem(
        503,
        "storage-failed",
        "The broker could not record this change; nothing was stored. Retry later.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def _not_found(
    req: falcon.Request, resp: falcon.Response, ex: FormulaNotFound, params: Any
) -> None:
    raise Problem(404, "formula-not-found", f"No formula has the id {ex.formula_id!r}.")


def _invalid_cursor(
    req: falcon.Request, resp: falcon.Response, ex: InvalidCursor, params: Any
) -> None:
    raise invalid([FieldError("cursor", "is not a cursor this server handed out")])


def _key_reused(
    req: falcon.Request, resp: falcon.Response, ex: IdempotencyKeyReused, params: Any
) -> None:
    raise Problem(
        422,
        "idempotency-key-reused",
        "This Idempotency-Key was first used with a different body.",
    )
