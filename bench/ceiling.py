"""The ceiling: a no-op Falcon app that only parses the JSON body and answers 202.

Served by the repository's gunicorn configuration with the application given
on the command line (``gunicorn -c gunicorn.conf.py bench.ceiling:app``), so it
measures what gunicorn, Falcon and a JSON parse cost on this machine: the most
any endpoint of ours could do. Every other figure is reported as a ratio to it.

``round_trip_app()`` is the same endpoint plus one ``ping`` to the broker per
request: the least any endpoint that asks the broker can cost. Every submit
asks the broker (the dedupe index lives there), so its ratio to the ceiling is
the most a submit could reach here, before any work of ours.
"""

from __future__ import annotations

import json

import falcon

from broker.client import BrokerClient
from broker.interface import SubmissionBroker
from broker.settings import Settings

_ACCEPTED = b'{"status":"accepted"}'


class NoOp:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        json.loads(req.bounded_stream.read())
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _ACCEPTED


class RoundTrip(NoOp):
    def __init__(self, broker: SubmissionBroker) -> None:
        self._broker = broker

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._broker.ping()
        super().on_post(req, resp)


app = falcon.App()
app.add_route("/formulas", NoOp())


def round_trip_app() -> falcon.App[falcon.Request, falcon.Response]:
    """gunicorn runs ``bench.ceiling:round_trip_app()``: connects after the fork, on use."""
    with_broker = falcon.App()
    with_broker.add_route("/formulas", RoundTrip(BrokerClient(Settings.from_env())))
    return with_broker
