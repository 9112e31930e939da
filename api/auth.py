"""Who may call: the bearer API key on every request, its scope, and its rate limit.

``Authenticate`` (Falcon middleware, installed by ``api.app`` when
``FORMULARY_AUTH=required``) lets ``GET /health`` and ``GET /openapi.json``
through and asks every other request for ``Authorization: Bearer <secret>``:

- before routing, the secret is checked: none, not a Bearer one, malformed,
  unknown or revoked is ``401`` with ``WWW-Authenticate``; the broker is asked
  only for a well-formed secret, and only with its digest (``broker.apikeys``).
  So an unknown path without a key is ``401`` too: what exists is for callers.
  Then, with ``FORMULARY_RATE_LIMIT``, one of the key's requests is spent
  (``429`` with ``Retry-After`` when none is left);
- after routing, the route's scope: a valid key without it is ``403``. A path
  that does not exist (``404``) or a method a path does not serve (``405``)
  needs no scope and gets its usual answer.

Every refusal is raised before a resource runs, so nothing is read from the
body and nothing is stored; ``api.connections.CloseUnread`` then closes a
connection whose body was left unread. ``caller(req)`` is the key's id
(``""`` without authentication): what the submit records as the owner of its
``Idempotency-Key``, what the access log and ``/metrics`` name. A secret is
never logged, echoed or kept, only its digest, as the key of a small cache.

The cache. Each gunicorn worker keeps the broker's ``authenticate`` answers,
hits and misses, for at most ``CACHE_SECONDS`` (1 s), so a busy key costs one
broker round trip a second per worker, and a revocation is seen by every
worker within that second plus the broker's own propagation (within 2 s in
all). It holds at most ``CACHE_SIZE`` answers; past that the oldest go first,
so a client sending made-up keys can neither grow it nor keep a revoked
key's answer alive. Every operation is O(1) (amortised for expiry).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import falcon

from api.problems import Problem
from broker.apikeys import METRICS, READ, SUBMIT, parse_secret
from broker.interface import ApiKey, SubmissionBroker

__all__ = [
    "CACHE_SECONDS",
    "CACHE_SIZE",
    "OPEN",
    "REALM",
    "REFUSALS",
    "ROUTE_SCOPES",
    "AnswerCache",
    "Authenticate",
    "caller",
    "refusal",
]

REALM: Final = "formulary"
CACHE_SECONDS: Final = 1.0
CACHE_SIZE: Final = 10_000

OPEN: Final = frozenset({("GET", "/health"), ("GET", "/openapi.json")})
"""``(method, path)`` answered without a key."""

ROUTE_SCOPES: Final = {
    ("POST", "/formulas"): SUBMIT,
    ("GET", "/formulas"): READ,
    ("GET", "/formulas/{formula_id}"): READ,
    ("GET", "/metrics"): METRICS,
}
"""The scope each ``(method, route template)`` needs; a route served and not
listed here (nor in ``OPEN``) is refused to every key, so a new route is
closed until it is given a scope."""

# Why a request was refused, as the access log and /metrics name it.
MISSING: Final = "missing"  # no Authorization, another scheme than Bearer, or no token
MALFORMED: Final = "malformed"  # a Bearer token that cannot be one of our secrets
INVALID: Final = "invalid"  # well formed, but unknown, revoked or not its key's secret
SCOPE: Final = "scope"  # a valid key without the route's scope
RATE_LIMITED: Final = "rate_limited"
REFUSALS: Final = {MISSING: 401, MALFORMED: 401, INVALID: 401, SCOPE: 403, RATE_LIMITED: 429}
"""Each refusal's reason and status."""


def caller(req: falcon.Request) -> str:
    """The id of the API key that made the request; ``""`` when none was checked."""
    key_id: str = getattr(req.context, "key_id", "")
    return key_id


def refusal(req: falcon.Request) -> str | None:
    """Why ``Authenticate`` refused the request (``MISSING``...), or None."""
    reason: str | None = getattr(req.context, "auth_refusal", None)
    return reason


class AnswerCache:
    """``authenticate`` answers by ``(key id, digest)``, each kept ``seconds`` at most.

    Entries sit in insertion order, and each lives equally long, so the
    oldest is always first: expiry and eviction both pop from the front.
    """

    def __init__(
        self,
        seconds: float = CACHE_SECONDS,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds = seconds
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: OrderedDict[tuple[str, str], tuple[float, ApiKey | None]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> tuple[bool, ApiKey | None]:
        """``(True, answer)`` while a fresh answer is kept, else ``(False, None)``."""
        now = self._clock()
        with self._lock:
            entry = self._answers.get(key)
            if entry is None:
                return False, None
            expires, answer = entry
            if now >= expires:
                del self._answers[key]
                return False, None
            return True, answer

    def put(self, key: tuple[str, str], answer: ApiKey | None) -> None:
        now = self._clock()
        with self._lock:
            self._answers.pop(key, None)
            while self._answers:
                oldest = next(iter(self._answers.values()))
                if now < oldest[0] and len(self._answers) < self._size:
                    break
                self._answers.popitem(last=False)
            self._answers[key] = (now + self._seconds, answer)

    def __len__(self) -> int:
        return len(self._answers)


class Authenticate:
    """Falcon middleware: the API key, its rate limit and the route's scope (module doc)."""

    def __init__(
        self,
        broker: SubmissionBroker,
        *,
        rate_limited: bool = False,
        cache: AnswerCache | None = None,
    ) -> None:
        self._broker = broker
        self._rate_limited = rate_limited
        self._cache = cache if cache is not None else AnswerCache()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if (req.method, req.path) in OPEN:
            return
        key = self._key(req)
        req.context.key_id = key.id
        req.context.scopes = key.scopes
        if self._rate_limited:
            wait = self._broker.rate_limit(key.id)
            if wait > 0:
                req.context.auth_refusal = RATE_LIMITED
                raise _rate_limited(wait)

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: object
    ) -> None:
        if (req.method, req.path) in OPEN:
            return
        needed = ROUTE_SCOPES.get((req.method, req.uri_template or ""))
        if needed is None and not callable(getattr(resource, f"on_{req.method.lower()}", None)):
            return  # a method this resource does not serve: Falcon's 405 (or OPTIONS)
        scopes: tuple[str, ...] = req.context.scopes
        if needed is None or needed not in scopes:
            req.context.auth_refusal = SCOPE
            raise _forbidden(needed)

    def _key(self, req: falcon.Request) -> ApiKey:
        header = req.get_header("Authorization")
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            req.context.auth_refusal = MISSING
            raise _unauthorized(
                "This request needs an API key: send Authorization: Bearer <secret>.",
                token_given=False,
            )
        parsed = parse_secret(token.strip())
        if parsed is None:
            req.context.auth_refusal = MALFORMED
            raise _unauthorized("The bearer token is not an API key's secret.")
        found, key = self._cache.get(parsed)
        if not found:
            key = self._broker.authenticate(*parsed)
            self._cache.put(parsed, key)
        if key is None:
            req.context.auth_refusal = INVALID
            raise _unauthorized("The API key is unknown or revoked.")
        return key


def _challenge(*params: str) -> str:
    return ", ".join([f'Bearer realm="{REALM}"', *params])


def _unauthorized(detail: str, *, token_given: bool = True) -> Problem:
    # RFC 6750 section 3: no error code when the request carried no bearer token.
    params = ('error="invalid_token"',) if token_given else ()
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": _challenge(*params)})


def _forbidden(scope: str | None) -> Problem:
    if scope is None:
        detail = "No API key may make this request."
        params: tuple[str, ...] = ('error="insufficient_scope"',)
    else:
        detail = f"The API key does not have the {scope!r} scope this request needs."
        params = ('error="insufficient_scope"', f'scope="{scope}"')
    return Problem(403, "forbidden", detail, headers={"WWW-Authenticate": _challenge(*params)})


def _rate_limited(wait: float) -> Problem:
    seconds = max(1, math.ceil(wait))
    return Problem(
        429,
        "rate-limited",
        f"The API key is over its rate limit; retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )
