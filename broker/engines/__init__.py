"""Where the broker keeps its state: the engines, and the one function that picks one.

Each engine implements ``broker.interface.Broker`` (plus ``close``) and keeps
every rule about state inside it; the broker process serves whichever
:func:`open_engine` returns, and nothing else in the project knows which it
is. ``FORMULARY_DATA`` decides:

- a file path, or ``:memory:`` for no file: ``broker.engines.embedded``,
  state in this process's memory, journalled to SQLite;
- ``postgresql://...`` (a libpq URI): ``broker.engines.postgres``, state in
  that database, shared by the brokers of every host that names it.

Engines are imported only when opened, so clients of the broker (the API, the
workers, the admin CLI) never load an engine's modules.
"""

from __future__ import annotations

from typing import Protocol

from broker.interface import Broker
from broker.settings import Settings

__all__ = ["Engine", "EngineError", "open_engine"]

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


class Engine(Broker, Protocol):
    """A broker that owns its state, as the broker process serves it."""

    def close(self) -> None:
        """Release the state's files or connections (the broker process calls it on exit)."""


class EngineError(Exception):
    """The state cannot be used (unreadable, corrupt, newer schema): never start afresh over it."""


def open_engine(settings: Settings) -> Engine:
    """The engine ``settings.data`` names, with its state recovered; raises ``EngineError``."""
    if settings.data.startswith(POSTGRESQL_SCHEMES):
        from broker.engines.postgres import open_postgres

        engine: Engine = open_postgres(settings)
        return engine
    from broker.engines.embedded import open_embedded

    return open_embedded(settings)
