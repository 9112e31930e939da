"""``/health``: 200 when the broker answers, 503 (via BrokerUnavailable) when not."""

from __future__ import annotations

import falcon

from api.representation import dumps
from broker.interface import SubmissionBroker


class HealthResource:
    def __init__(self, broker: SubmissionBroker) -> None:
        self._broker = broker

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._broker.ping()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = dumps({"status": "ok", "broker": "reachable"})
