"""How the API treats its HTTP connections: bodies read within a deadline, and clean closes.

gunicorn runs the app in gevent workers (see ``gunicorn.conf.py``): every
connection is a greenlet, so a client that stalls holds only its own socket
and greenlet, never a thread that others wait for. gunicorn bounds the wait
for a request's head (and an idle keep-alive) by its ``keepalive`` setting;
this module bounds the rest.

- :func:`read_within` reads a request body within ``FORMULARY_READ_TIMEOUT``
  seconds, all of it, or raises :class:`BodyTimeout` (the app answers 408).
  Under gevent the whole read is under one timer, so a client that trickles
  a byte at a time is cut off too; elsewhere (a threaded server) each wait
  for data is bounded by a socket timeout.
- :class:`CloseUnread` (middleware) answers ``Connection: close`` whenever an
  error leaves bytes of the request unread on the connection (a 413 answered
  from the headers, a 415, a 408 mid-body...): the client then opens a new
  connection instead of racing those bytes with its next request.
- :func:`honour_connection_close` makes gunicorn keep that promise: gunicorn
  drops an application's ``Connection`` header (it is hop-by-hop) and would
  keep the connection open, so the wrapper asks the server's response object
  to close it, through its public ``force_close``.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import falcon

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BodyTimeout(Exception):
    """The client did not send its whole body within the read deadline."""


def read_within(req: falcon.Request, limit: int, seconds: float) -> bytes:
    """Up to ``limit + 1`` bytes of the body, read within ``seconds``; else ``BodyTimeout``."""
    with _deadline(req.env, seconds):
        body: bytes = req.bounded_stream.read(limit + 1)
    if len(body) <= limit:
        req.context.body_read = True  # the stream is at its end: nothing left unread
    return body


@contextlib.contextmanager
def _deadline(environ: dict[str, Any], seconds: float) -> Iterator[None]:
    # gevent is in use only when a gevent worker has patched the socket module.
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        try:
            with sys.modules["gevent"].Timeout(seconds, BodyTimeout):
                yield
        except BodyTimeout:
            raise BodyTimeout(f"the body did not arrive within {seconds:g} s") from None
        return
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        yield  # no server socket (an in-process test client): nothing can stall
        return
    previous = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    except TimeoutError:
        raise BodyTimeout(f"no part of the body arrived for {seconds:g} s") from None
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


class CloseUnread:
    """Falcon middleware: ``Connection: close`` on an error that leaves request bytes unread."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if (
            resp.status_code >= 400
            and _has_body(req)
            and not getattr(req.context, "body_read", False)
        ):
            resp.set_header("Connection", "close")


def _has_body(req: falcon.Request) -> bool:
    length = req.content_length
    return bool(length) or req.get_header("Transfer-Encoding") is not None


def honour_connection_close(app: WSGIApp) -> WSGIApp:
    """``app``, with its ``Connection: close`` answers closing the connection under gunicorn."""

    def closing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                # gunicorn's start_response is a bound method of its response.
                force_close = getattr(
                    getattr(start_response, "__self__", None), "force_close", None
                )
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return closing_app
