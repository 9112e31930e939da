"""``python -m worker``: consume formulas until SIGTERM or Ctrl-C.

The main thread only supervises: consumer threads do the work. The first
SIGTERM/SIGINT asks them to stop receiving and finish what they hold; past
``--grace`` seconds the messages still held are released for other workers.
A second signal exits at once; leases then run out and the broker redelivers.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from types import FrameType

from broker.client import BrokerClient
from broker.settings import Settings, SettingsError, configure_logging
from worker.consumer import Backoff, Consumer, Heartbeat
from worker.handlers import load_handler

log = logging.getLogger("worker")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_FORCED = 3  # second signal: stopped without waiting


def parse_args(argv: list[str] | None, settings: Settings) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=1, help="handler threads (default 1)")
    parser.add_argument("--batch", type=int, default=10, help="messages per receive (default 10)")
    parser.add_argument("--wait", type=float, default=1.0, help="long-poll seconds (default 1)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to finish on stop")
    parser.add_argument(
        "--retry-base", type=float, default=1.0, help="first retry delay ceiling (s)"
    )
    parser.add_argument("--retry-cap", type=float, default=60.0, help="longest retry delay (s)")
    parser.add_argument("--handler", help="module:function (FORMULARY_HANDLER)")
    parser.add_argument("--address", help="broker address (FORMULARY_BROKER_ADDRESS)")
    parser.add_argument("--log-level", help="DEBUG, INFO... (FORMULARY_LOG_LEVEL)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.batch < 1:
        parser.error("--concurrency and --batch must be at least 1")
    overrides = {
        "handler": args.handler,
        "broker_address": args.address,
        "log_level": args.log_level.upper() if args.log_level else None,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    return settings, args


class Signals:
    """Counts stop signals; the handler does nothing else."""

    def __init__(self) -> None:
        self.received = 0
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        self.event.set()


def main(argv: list[str] | None = None) -> int:
    try:
        settings, args = parse_args(argv, Settings.from_env())
        handler = load_handler(settings.handler)
    except (SettingsError, ValueError, ImportError) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)

    # Each consumer and each heartbeat holds at most one call at a time.
    client = BrokerClient(settings, max_connections=2 * args.concurrency + 1)
    base = f"{socket.gethostname()}:{os.getpid()}"
    consumers = [
        Consumer(
            client,
            handler,
            name=f"{base}:{i}",
            batch_size=args.batch,
            visibility_timeout=settings.visibility_timeout,
            wait_seconds=args.wait,
            backoff=Backoff(base=args.retry_base, cap=args.retry_cap),
        )
        for i in range(args.concurrency)
    ]
    heartbeat_stop = threading.Event()
    threads = [threading.Thread(target=c.run, name=c.name, daemon=True) for c in consumers]
    threads += [
        threading.Thread(target=Heartbeat(c).run, args=(heartbeat_stop,), daemon=True)
        for c in consumers
    ]
    for thread in threads:
        thread.start()
    log.info(
        "worker %s started: %d consumer(s), handler %s", base, len(consumers), settings.handler
    )

    signals.event.wait()
    log.info("stopping: finishing messages in hand (grace %.0fs)", args.grace)
    for consumer in consumers:
        consumer.stop()
    signals.event.clear()
    consumer_threads = threads[: len(consumers)]
    deadline = _deadline(args.grace)
    for thread in consumer_threads:
        while thread.is_alive() and signals.received < 2 and _remaining(deadline) > 0:
            thread.join(min(0.1, _remaining(deadline)))
    if signals.received >= 2:
        log.warning("second signal: exiting now; held leases will run out")
        return EXIT_FORCED
    heartbeat_stop.set()
    for consumer in consumers:
        consumer.release_all()
    log.info("worker %s stopped", base)
    return EXIT_OK


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


if __name__ == "__main__":
    sys.exit(main())
