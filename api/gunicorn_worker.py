"""The gunicorn worker the API runs in: gevent's, letting idle connections go at shutdown.

gunicorn's gevent worker stops gracefully on SIGTERM: it stops accepting, then
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

from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import gevent
from gunicorn.workers.ggevent import GeventWorker

SHUTDOWN_HEAD_WAIT = 1.0
"""Seconds a connection accepted just before shutdown has to send its request head."""


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's gevent worker; waits for a request head end when shutdown starts."""

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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler must not switch greenlets: end the waits from one of its own.
        gevent.spawn(self.end_head_waits)

    def end_head_waits(self) -> None:
        for greenlet, timer in list(self.waiting_for_head.items()):
            greenlet.kill(timer, block=False)  # raised at the wait, where ``timer`` ends it
