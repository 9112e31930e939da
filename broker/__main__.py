"""``python -m broker``: run the broker process until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from broker.admin import AdminCommands, AdminServer
from broker.engines import EngineError, open_engine
from broker.settings import Settings, SettingsError, configure_logging
from broker.transport import make_server

log = logging.getLogger("broker")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DATA = 3  # the engine's state cannot be used: never start fresh over it


def parse_args(argv: list[str] | None, settings: Settings) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    parser.add_argument(
        "--address", help="Unix socket path or host:port (FORMULARY_BROKER_ADDRESS)"
    )
    parser.add_argument(
        "--data", help="the engine: a journal file path or :memory: (FORMULARY_DATA)"
    )
    parser.add_argument(
        "--admin-socket", type=Path, help="admin socket path (FORMULARY_ADMIN_SOCKET)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (FORMULARY_LOG_LEVEL)")
    args = parser.parse_args(argv)
    overrides = {
        "broker_address": args.address,
        "data": args.data,
        "admin_socket": args.admin_socket,
        "log_level": args.log_level.upper() if args.log_level else None,
    }
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv, Settings.from_env())
    except SettingsError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    # What is recovered lives as long as the process: keep it out of every
    # garbage collection (a full one over millions of objects stalls submits),
    # from the start: the first collection after the engine opened would walk
    # all of it (0.1-0.2 s per 300,000 formulas). What is stored from now on
    # never enters one: the embedded engine keeps it in plain tuples the
    # collector stops tracking (its store's docstring).
    gc.disable()
    try:
        broker = open_engine(settings)
    except EngineError as exc:
        log.error("cannot use the state: %s", exc)
        return EXIT_DATA
    finally:
        gc.freeze()
        gc.enable()
    try:
        server = make_server(broker, settings)
    except (SettingsError, OSError) as exc:
        log.error("cannot start: %s", exc)
        broker.close()
        return EXIT_CONFIG
    admin = AdminServer(settings.admin_socket, AdminCommands(broker))
    try:
        admin.start()
    except (SettingsError, OSError) as exc:
        log.error("cannot open the admin socket: %s", exc)
        if not settings.uses_tcp:
            Path(settings.broker_address).unlink(missing_ok=True)
        broker.close()
        return EXIT_CONFIG

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only record it: serve_forever's loop notices within a second.
        server.stop_event.set()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "broker serving on %s, admin socket %s, data %s (pid %d)",
        settings.broker_address,
        settings.admin_socket,
        settings.data,
        os.getpid(),
    )
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        # Closing the listener also removes its Unix socket file.
        server.listener.close()  # type: ignore[attr-defined]
        admin.close()
        broker.close()
        log.info("broker stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
