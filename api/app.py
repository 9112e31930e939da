"""The Falcon WSGI app. gunicorn runs ``api.app:get_app()`` in each worker."""

from __future__ import annotations

import falcon

from api import problems
from api.formulas import FormulaResource, FormulasResource
from api.health import HealthResource
from broker.client import BrokerClient
from broker.interface import SubmissionBroker
from broker.settings import Settings


def create_app(broker: SubmissionBroker) -> falcon.App[falcon.Request, falcon.Response]:
    app = falcon.App()
    app.add_route("/formulas", FormulasResource(broker))
    app.add_route("/formulas/{formula_id}", FormulaResource(broker))
    app.add_route("/health", HealthResource(broker))
    problems.register(app)
    return app


def get_app(settings: Settings | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    """The app on a broker client that connects lazily, after gunicorn's fork."""
    return create_app(BrokerClient(settings or Settings.from_env()))
