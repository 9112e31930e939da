"""``/openapi.json``: the OpenAPI 3.1 document of the whole HTTP API.

Built as plain data from the same constants the code enforces (limits, header
names), so the two cannot drift apart silently; ``tests/test_openapi.py``
validates it and runs schemathesis against the live server to hold the server
to it. The SPEC's rules are written as JSON Schema as far as JSON Schema
reaches; the rest (a name's identity key, the sum of concentrations, exact
decimals, nesting depth, body size) is said in ``description``.
"""

from __future__ import annotations

from typing import Any

import falcon

from api.auth import OPEN, REALM, ROUTE_SCOPES
from api.formulas import DEFAULT_LIMIT, MAX_CURSOR_LENGTH, MAX_KEY_LENGTH, MAX_LIMIT
from api.middleware import MAX_REQUEST_ID_LENGTH, REQUEST_ID_HEADER
from api.problems import PROBLEM_JSON
from api.representation import dumps
from broker.formula import MAX_DECIMAL_PLACES, MAX_MATERIALS, MAX_NAME_LENGTH
from broker.strict_json import MAX_BODY_BYTES, MAX_DEPTH

VERSION = "0.1.0"
JSON = falcon.MEDIA_JSON
Document = dict[str, Any]

_PRINTABLE_ASCII = "[ -~]"
# No control characters (Unicode Cc) anywhere, and at least one character
# that is not whitespace: the closest JSON Schema gets to "trimmed, 1 to 200".
_CONTROL = "\\u0000-\\u001f\\u007f-\\u009f"
_NAME_PATTERN = f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$"
_ID_PATTERN = "^[A-Za-z0-9_-]{16,}$"
_KEY = f"{_PRINTABLE_ASCII}{{1,{MAX_KEY_LENGTH}}}"

EXAMPLE = {
    "name": "Summer Breeze",
    "materials": [
        {"name": "Bergamot Oil", "concentration": 15.5},
        {"name": "Lavender Absolute", "concentration": 10.0},
        {"name": "Sandalwood", "concentration": 5.2},
    ],
}


def ref(kind: str, name: str) -> Document:
    return {"$ref": f"#/components/{kind}/{name}"}


def response(
    description: str,
    schema: str | None = None,
    media_type: str = JSON,
    headers: tuple[str, ...] = (),
) -> Document:
    """A response object; every response carries ``X-Request-Id``."""
    result: Document = {
        "description": description,
        "headers": {
            REQUEST_ID_HEADER: ref("headers", "RequestId"),
            **{name: ref("headers", name.replace("-", "")) for name in headers},
        },
    }
    if schema is not None:
        result["content"] = {media_type: {"schema": ref("schemas", schema)}}
    return result


def problem(description: str, schema: str = "Problem", headers: tuple[str, ...] = ()) -> Document:
    return response(description, schema, PROBLEM_JSON, headers)


def _name_schema(what: str) -> Document:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_NAME_LENGTH,
        "pattern": _NAME_PATTERN,
        "description": (
            f"The {what}. Trimmed of Unicode whitespace at both ends it is 1 to "
            f"{MAX_NAME_LENGTH} characters, with no control characters (Unicode Cc) "
            "and no lone surrogates; it is stored trimmed."
        ),
    }


SCHEMAS: Document = {
    "FormulaSubmission": {
        "type": "object",
        "description": (
            "A formula to store. Exactly these keys (unknown or repeated keys are refused), "
            f"no NaN or Infinity, valid UTF-8, nested at most {MAX_DEPTH} levels deep, at "
            f"most {MAX_BODY_BYTES} bytes. Two formulas are the same when their materials "
            "are: same identity keys (NFKC, trimmed, inner whitespace collapsed, "
            "casefolded) with the same exact concentrations, in any order; the formula's "
            "name plays no part."
        ),
        "required": ["name", "materials"],
        "additionalProperties": False,
        "properties": {
            "name": _name_schema("formula's name"),
            "materials": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_MATERIALS,
                "description": (
                    "No two materials share an identity key, and the concentrations "
                    "add up to at most 100."
                ),
                "items": ref("schemas", "MaterialSubmission"),
            },
        },
    },
    "MaterialSubmission": {
        "type": "object",
        "required": ["name", "concentration"],
        "additionalProperties": False,
        "properties": {
            "name": _name_schema("material's name"),
            "concentration": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 100,
                "multipleOf": 10**-MAX_DECIMAL_PLACES,
                "description": (
                    "A percentage, read as an exact decimal from the JSON text (never "
                    f"through a float), with at most {MAX_DECIMAL_PLACES} decimal places "
                    "in its value. A JSON number: a string or boolean is refused."
                ),
            },
        },
    },
    "Material": {
        "type": "object",
        "required": ["name", "concentration"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "description": "As submitted, trimmed."},
            "concentration": {
                "type": "number",
                "description": "Its exact decimal digits, shortest form (10.0 is 10).",
            },
        },
    },
    "Formula": {
        "type": "object",
        "required": [
            "id",
            "name",
            "materials",
            "fingerprint",
            "status",
            "message_id",
            "created_at",
            "deliveries",
            "processed_at",
            "summary",
        ],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": _ID_PATTERN, "description": "Opaque, URL-safe."},
            "name": {"type": "string"},
            "materials": {"type": "array", "items": ref("schemas", "Material")},
            "fingerprint": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "description": "SHA-256 (hex) of the canonical make-up.",
            },
            "status": {"type": "string", "enum": ["queued", "processed", "failed"]},
            "message_id": {"type": "string", "minLength": 1},
            "created_at": {"type": "string", "format": "date-time"},
            "deliveries": {
                "type": "integer",
                "minimum": 0,
                "description": "Deliveries to workers over the formula's life.",
            },
            "processed_at": {"type": ["string", "null"], "format": "date-time"},
            "summary": {
                "oneOf": [{"type": "null"}, ref("schemas", "Summary")],
                "description": "The handler's result; null until processed.",
            },
        },
    },
    "Summary": {
        "type": "object",
        "description": "What the handler recorded; these are the default handler's figures.",
        "properties": {
            "material_count": {"type": "integer", "minimum": 1},
            "total_concentration": {"type": "number"},
            "carrier_remainder": {"type": "number", "description": "100 - total_concentration"},
        },
    },
    "FormulaPage": {
        "type": "object",
        "required": ["items", "next"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": ref("schemas", "Formula")},
            "next": {
                "type": ["string", "null"],
                "description": "Pass back as cursor for the next page; null on the last.",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "broker"],
        "properties": {
            "status": {"const": "ok"},
            "broker": {"const": "reachable"},
        },
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": "urn:formulary:problem:SLUG, or about:blank for plain HTTP errors.",
            },
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
        },
    },
    "FieldError": {
        "type": "object",
        "required": ["field", "message"],
        "properties": {
            "field": {
                "type": "string",
                "description": "body, name, materials[1].concentration, limit, Idempotency-Key...",
            },
            "message": {"type": "string"},
        },
    },
    "ValidationProblem": {
        "allOf": [
            ref("schemas", "Problem"),
            {
                "type": "object",
                "required": ["errors"],
                "properties": {
                    "errors": {
                        "type": "array",
                        "minItems": 1,
                        "items": ref("schemas", "FieldError"),
                    }
                },
            },
        ]
    },
    "DuplicateProblem": {
        "allOf": [
            ref("schemas", "Problem"),
            {
                "type": "object",
                "required": ["existing_id", "fingerprint"],
                "properties": {
                    "existing_id": {"type": "string", "pattern": _ID_PATTERN},
                    "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
        ]
    },
    "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
}


def _header(description: str, schema: Document, required: bool = True) -> Document:
    return {"description": description, "required": required, "schema": schema}


HEADERS: Document = {
    "RequestId": _header(
        "The request's id: the client's X-Request-Id when well formed, else a new one.",
        {"type": "string", "pattern": f"^{_PRINTABLE_ASCII}{{1,{MAX_REQUEST_ID_LENGTH}}}$"},
    ),
    "Location": _header(
        "Path of the formula.", {"type": "string", "pattern": "^/formulas/[A-Za-z0-9_-]+$"}
    ),
    "RetryAfter": _header(
        "Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}
    ),
    "IdempotentReplayed": _header(
        "Present when this is the first answer to the Idempotency-Key, replayed.",
        {"type": "string", "const": "true"},
        required=False,
    ),
    "AcceptPost": _header("The media type POST accepts.", {"type": "string", "const": JSON}),
    "WWWAuthenticate": _header(
        f'The challenge: Bearer realm="{REALM}", with error="invalid_token" when a token was '
        'sent, or error="insufficient_scope" and the scope needed (RFC 6750).',
        {"type": "string", "pattern": "^Bearer "},
    ),
    "Allow": _header("The methods this path supports.", {"type": "string"}),
}

PARAMETERS: Document = {
    "RequestId": {
        "name": REQUEST_ID_HEADER,
        "in": "header",
        "required": False,
        "description": (
            f"1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters, echoed in the "
            "response and logged; any other value is replaced by a new id."
        ),
        "schema": {"type": "string"},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": (
            f"1 to {MAX_KEY_LENGTH} printable ASCII characters, optionally in double quotes. "
            "A retry with the same key and the same body (equal as parsed JSON) gets the "
            "first 202 or 409 again with Idempotent-Replayed: true; the same key with "
            "another body is 422. A malformed key is 400."
        ),
        "schema": {
            "type": "string",
            "pattern": f'^(?:{_KEY}|"{_KEY}")$',
        },
    },
    "Limit": {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    },
    "Cursor": {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "The next of an earlier page; opaque.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR_LENGTH},
    },
    "FormulaId": {
        "name": "formula_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
}

RESPONSES: Document = {
    "BadRequest": problem(
        "Not valid; every problem is listed in errors. Nothing was stored.", "ValidationProblem"
    ),
    "NotFound": problem("Nothing is at this path (or no formula has this id)."),
    "MethodNotAllowed": problem(
        "Any method a path does not list here; Allow names those it does.", headers=("Allow",)
    ),
    "Unauthorized": problem(
        "No API key, or one that is malformed, unknown or revoked. Nothing was stored.",
        headers=("WWW-Authenticate",),
    ),
    "Forbidden": problem(
        "The API key does not have the scope this operation needs. Nothing was stored.",
        headers=("WWW-Authenticate",),
    ),
    "TooManyRequests": problem(
        "The API key is over FORMULARY_RATE_LIMIT. Nothing was stored; retry after "
        "Retry-After seconds.",
        headers=("Retry-After",),
    ),
    "Unavailable": problem(
        "The broker cannot be reached, or (POST) the queue is at capacity. "
        "Nothing was stored; retry later.",
        headers=("Retry-After",),
    ),
}

_REQUEST_ID = ref("parameters", "RequestId")

PATHS: Document = {
    "/formulas": {
        "parameters": [_REQUEST_ID],
        "post": {
            "operationId": "submitFormula",
            "summary": "Store a new make-up and queue it for the workers.",
            "parameters": [ref("parameters", "IdempotencyKey")],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": ref("schemas", "FormulaSubmission"),
                        "examples": {"summer": {"value": EXAMPLE}},
                    }
                },
            },
            "responses": {
                "202": response(
                    "Stored, and one formula.created message published.",
                    "Formula",
                    headers=("Location", "Idempotent-Replayed"),
                ),
                "400": ref("responses", "BadRequest"),
                "409": problem(
                    "The same make-up is already stored (existing_id); nothing was stored.",
                    "DuplicateProblem",
                    headers=("Location", "Idempotent-Replayed"),
                ),
                "408": problem(
                    "The body did not arrive within the read timeout; the connection is closed."
                ),
                "413": problem(
                    f"The body is over {MAX_BODY_BYTES} bytes; it was not read, and the "
                    "connection is closed."
                ),
                "415": problem("The body is not application/json.", headers=("Accept-Post",)),
                "422": problem("This Idempotency-Key came first with a different body."),
                "503": ref("responses", "Unavailable"),
            },
        },
        "get": {
            "operationId": "listFormulas",
            "summary": "Stored formulas, newest first, a page at a time.",
            "parameters": [ref("parameters", "Limit"), ref("parameters", "Cursor")],
            "responses": {
                "200": response("A page of formulas.", "FormulaPage"),
                "400": ref("responses", "BadRequest"),
                "503": ref("responses", "Unavailable"),
            },
        },
    },
    "/formulas/{formula_id}": {
        "parameters": [_REQUEST_ID, ref("parameters", "FormulaId")],
        "get": {
            "operationId": "getFormula",
            "summary": "A formula with its processing state.",
            "responses": {
                "200": response("The formula.", "Formula"),
                "404": ref("responses", "NotFound"),
                "503": ref("responses", "Unavailable"),
            },
        },
    },
    "/health": {
        "parameters": [_REQUEST_ID],
        "get": {
            "operationId": "health",
            "summary": "Whether the broker answers.",
            "responses": {
                "200": response("The broker answers.", "Health"),
                "503": ref("responses", "Unavailable"),
            },
        },
    },
    "/metrics": {
        "parameters": [_REQUEST_ID],
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics of all API workers and of the broker.",
            "description": (
                "Prometheus text format (OpenMetrics when the Accept header asks for it). "
                "Answers 200 even when the broker does not, with formulary_broker_up 0 (with "
                "FORMULARY_AUTH=required, only when the key was checked in the last second: "
                "otherwise the key cannot be checked, and the answer is 503)."
            ),
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "headers": {REQUEST_ID_HEADER: ref("headers", "RequestId")},
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                "503": ref("responses", "Unavailable"),
            },
        },
    },
    "/openapi.json": {
        "parameters": [_REQUEST_ID],
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {"200": response("The OpenAPI document.", "OpenApi")},
        },
    },
}


SECURITY_SCHEMES: Document = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": (
            "An API key's secret (fmk.<key id>.<random>), made on the broker's admin socket "
            "with `key create NAME [SCOPE,...]`. Each operation lists the scope it needs "
            "(submit, read or metrics). Not needed with FORMULARY_AUTH=off."
        ),
    }
}


def secured(paths: Document) -> Document:
    """``paths`` with each operation's security: the scope it needs and its 401/403/429."""
    result: Document = {}
    for path, item in paths.items():
        result[path] = dict(item)
        for method, operation in item.items():
            if method == "parameters":
                continue
            if (method.upper(), path) in OPEN:
                result[path][method] = {**operation, "security": []}
                continue
            scope = ROUTE_SCOPES[(method.upper(), path)]
            result[path][method] = {
                **operation,
                "security": [{"apiKey": [scope]}],
                "responses": {
                    **operation["responses"],
                    "401": ref("responses", "Unauthorized"),
                    "403": ref("responses", "Forbidden"),
                    "429": ref("responses", "TooManyRequests"),
                },
            }
    return result


def document() -> Document:
    """The whole OpenAPI 3.1 document, as plain data."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Formulary",
            "version": VERSION,
            "description": (
                "Fragrance formula submissions: each distinct make-up stored once and handed "
                "to background workers once. Errors are RFC 9457 problem details. An unknown "
                "path is 404 (components/responses/NotFound); a method a path does not list "
                "is 405 with Allow (components/responses/MethodNotAllowed). Every response "
                "carries X-Request-Id. With FORMULARY_AUTH=required (the default) every "
                "operation but health and openapi needs an API key as a bearer token; without "
                "one, any other request, to any path, is 401."
            ),
        },
        "paths": secured(PATHS),
        "components": {
            "securitySchemes": SECURITY_SCHEMES,
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "responses": RESPONSES,
        },
    }


class OpenApiResource:
    def __init__(self) -> None:
        self._body = dumps(document())

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON
        resp.data = self._body
