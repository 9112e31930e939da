"""The Falcon WSGI app. gunicorn runs ``api.app:get_app()`` in each worker."""

from __future__ import annotations

import falcon

from api import problems
from api.auth import AnswerCache, Authenticate
from api.connections import CloseUnread, WSGIApp, honour_connection_close
from api.formulas import FormulaResource, FormulasResource
from api.health import HealthResource
from api.metrics import MetricsResource
from api.middleware import RequestLog
from api.openapi import OpenApiResource
from broker.client import BrokerClient
from broker.interface import SubmissionBroker
from broker.settings import Settings, configure_logging


def create_app(
    broker: SubmissionBroker, settings: Settings, *, auth_cache: AnswerCache | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The app on ``broker``; ``settings`` gives the read timeout, auth mode and rate limit.

    ``auth_cache`` replaces the default cache of ``authenticate`` answers (tests
    pass one with their own clock).
    """
    app = falcon.App(middleware=(RequestLog(), CloseUnread()))
    if settings.auth_required:
        # After RequestLog, whose process_response then logs and counts a refusal.
        rate_limited = settings.rate_limit is not None
        app.add_middleware(Authenticate(broker, rate_limited=rate_limited, cache=auth_cache))
    app.add_route("/formulas", FormulasResource(broker, settings.read_timeout))
    app.add_route("/formulas/{formula_id}", FormulaResource(broker))
    app.add_route("/health", HealthResource(broker))
    app.add_route("/metrics", MetricsResource(broker))
    app.add_route("/openapi.json", OpenApiResource())
    problems.register(app)
    return app


def get_app(settings: Settings | None = None) -> WSGIApp:
    """The app on a broker client that connects lazily, after gunicorn's fork."""
    settings = settings or Settings.from_env()
    # Our loggers (api.access, broker.client...) go to stderr at the configured
    # level; gunicorn's own loggers keep their handlers.
    configure_logging(settings)
    app = create_app(BrokerClient(settings), settings)
    return honour_connection_close(app)
