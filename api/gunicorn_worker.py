"""The gunicorn worker the API runs in: gevent's, fair between connections, letting idle ones go.

Fairness. A greenlet runs until it waits for something. One that reads a
request whose bytes are already there, answers it without asking the broker
(an error, a 404, ``/openapi.json``) and finds the next request there too
never waits: a client that sends its requests back to back (pipelined) kept
its worker to itself, and every other connection of that worker waited, for
as long as the client kept sending (more than 30 s in a test). So after
each answer, if the next request's bytes are already there (read ahead, or
readable on the socket), :class:`Worker` gives the other connections a turn
first: it sleeps until the event loop's next iteration, in which every
connection with bytes waiting gets its turn. (``gevent.sleep(0)`` would only
let greenlets already runnable go first; gevent documents that it may not
let the loop poll for I/O.) A client that waits for each answer before
sending its next request, as almost all do, never triggers it: yielding
after every request instead cost 15-25 % of ingest at 8 connections.

Shutdown. gunicorn's gevent worker stops gracefully on SIGTERM: it stops accepting, then
waits (up to ``graceful_timeout``) until every connection's greenlet has
ended. A keep-alive connection idle between requests ends only when its
keep-alive time runs out (``FORMULARY_READ_TIMEOUT``, 10 s by default), so one
idle client held every restart and every Ctrl-C for those seconds.

:class:`Worker` ends those waits the moment shutdown starts, as if the
keep-alive time had run out: the connection closes cleanly, with no answer
owed on it. Requests being answered finish as before, and gunicorn closes
their connections after the answer. ``gunicorn.conf.py`` names this class.
"""

from __future__ import annotations

import io
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

SHUTDOWN_HEAD_WAIT = 1.0
"""Seconds a connection accepted just before shutdown has to send its request head."""

NEXT_LOOP_ITERATION = 1e-6
"""A sleep this short ends in the event loop's next iteration, after the other connections'."""


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's gevent worker: others get a turn before a request already waiting is
    read, and the waits for a request head end when shutdown starts."""

    def init_process(self) -> None:
        self.waiting_for_head: dict[gevent.Greenlet, gevent.Timeout] = {}
        super().init_process()

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        # gunicorn reads every request head, the first on a connection and
        # each keep-alive one after, under this context.
        seconds = self.cfg.keepalive if self.alive else min(self.cfg.keepalive, SHUTDOWN_HEAD_WAIT)
        timer = gevent.Timeout(seconds, False)  # False: running out ends the wait quietly
        me = gevent.getcurrent()
        self.waiting_for_head[me] = timer
        try:
            with timer:
                yield
        finally:
            del self.waiting_for_head[me]

    def handle_request(self, listener_name: str, req: Any, sock: Any, addr: Any) -> Any:
        answered = super().handle_request(listener_name, req, sock, addr)
        if next_request_waiting(req, sock):
            gevent.sleep(NEXT_LOOP_ITERATION)  # the other connections' turn first
        return answered

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler must not switch greenlets: end the waits from one of its own.
        gevent.spawn(self.end_head_waits)

    def end_head_waits(self) -> None:
        for greenlet, timer in list(self.waiting_for_head.items()):
            greenlet.kill(timer, block=False)  # raised at the wait, where ``timer`` ends it


def next_request_waiting(req: Any, sock: socket.socket) -> bool:
    """Whether the next request's bytes are already here: read ahead, or on the socket."""
    buffered = req.unreader.buf
    buffered.seek(0, io.SEEK_END)
    if buffered.tell():
        return True
    readable, _, _ = select.select([sock], [], [], 0)  # gevent's: does not wait with 0
    return bool(readable)
