"""``/formulas`` and ``/formulas/{id}``: HTTP in, broker calls, HTTP out."""

from __future__ import annotations

import hashlib

import falcon

from api import connections
from api.auth import caller
from api.problems import Problem, invalid
from api.representation import dumps, formula_location
from broker.errors import FieldError
from broker.formula import canonical_json, validate_formula
from broker.interface import MAX_PAGE, IdempotencyKey, SubmissionBroker
from broker.strict_json import MAX_BODY_BYTES, parse_json

DEFAULT_LIMIT = 50
MAX_LIMIT = MAX_PAGE  # the broker answers at most this many per page
MAX_KEY_LENGTH = 255
# Cursors handed out are a dozen characters; a longer one cannot be ours, and
# refusing it here keeps an arbitrarily long string away from the decoder.
MAX_CURSOR_LENGTH = 64


class FormulasResource:
    def __init__(self, broker: SubmissionBroker, read_timeout: float) -> None:
        self._broker = broker
        self._read_timeout = read_timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_json(req)
        key = idempotency_key(req)
        body = read_body(req, self._read_timeout)
        document = parse_json(body)
        draft = validate_formula(document)
        idempotency = None
        if key is not None:
            digest = hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()
            # The key belongs to the API key that sent it (auth off: one shared owner, "").
            idempotency = IdempotencyKey(key, digest, owner=caller(req))
        submission = self._broker.submit(draft, idempotency)
        resp.status = falcon.HTTP_202
        resp.location = formula_location(submission.formula.id)
        if submission.replayed:
            resp.set_header("Idempotent-Replayed", "true")
        resp.content_type = falcon.MEDIA_JSON
        resp.data = dumps(submission.formula.as_data())

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = page_limit(req)
        cursor = req.get_param("cursor")
        if cursor is not None and not cursor:
            raise invalid([FieldError("cursor", "must not be empty")])
        if cursor is not None and len(cursor) > MAX_CURSOR_LENGTH:
            raise invalid([FieldError("cursor", "is not a cursor this server handed out")])
        page = self._broker.list_formulas(limit, cursor)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = dumps({"items": [f.as_data() for f in page.items], "next": page.next_cursor})


class FormulaResource:
    def __init__(self, broker: SubmissionBroker) -> None:
        self._broker = broker

    def on_get(self, req: falcon.Request, resp: falcon.Response, formula_id: str) -> None:
        formula = self._broker.get_formula(formula_id)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = dumps(formula.as_data())


def require_json(req: falcon.Request) -> None:
    """415 unless the body is ``application/json`` (any case, parameters allowed)."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            "The body must be application/json.",
            headers={"Accept-Post": "application/json"},
        )


def read_body(req: falcon.Request, read_timeout: float) -> bytes:
    """The body: 413 past ``MAX_BODY_BYTES`` (the rest is never read), 408 past the deadline.

    Either refusal leaves bytes unread, so its answer closes the connection
    (``api.connections.CloseUnread``).
    """
    length = req.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        body = connections.read_within(req, MAX_BODY_BYTES, read_timeout)
    except connections.BodyTimeout as exc:
        raise Problem(408, "request-timeout", f"{exc}; send the whole request sooner.") from None
    if len(body) > MAX_BODY_BYTES:
        raise _too_large()
    return body


def _too_large() -> Problem:
    return Problem(413, "body-too-large", f"The body is larger than {MAX_BODY_BYTES} bytes.")


def idempotency_key(req: falcon.Request) -> str | None:
    """The ``Idempotency-Key`` header: 1-255 printable ASCII, quotes optional."""
    raw = req.get_header("Idempotency-Key")
    if raw is None:
        return None
    key = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in key):
        raise invalid(
            [FieldError("Idempotency-Key", "must be 1 to 255 printable ASCII characters")],
            "The Idempotency-Key header is not valid.",
        )
    return key


def page_limit(req: falcon.Request) -> int:
    raw = req.get_param("limit")
    if raw is None:
        return DEFAULT_LIMIT
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and
    # few enough that int() cannot hit its digit limit.
    digits = raw.isascii() and raw.isdigit() and len(raw) <= 9
    if not digits or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid([FieldError("limit", f"must be a whole number from 1 to {MAX_LIMIT}")])
    return int(raw)
