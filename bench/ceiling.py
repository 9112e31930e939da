"""The ceiling: a no-op Falcon app that only parses the JSON body and answers 202.

Served by the repository's gunicorn configuration with the application given
on the command line (``gunicorn -c gunicorn.conf.py bench.ceiling:app``), so it
measures what gunicorn, Falcon and a JSON parse cost on this machine: the most
any endpoint of ours could do. Every other figure is reported as a ratio to it.
"""

from __future__ import annotations

import json

import falcon

_ACCEPTED = b'{"status":"accepted"}'


class NoOp:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        json.loads(req.bounded_stream.read())
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _ACCEPTED


app = falcon.App()
app.add_route("/formulas", NoOp())
