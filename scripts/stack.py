"""Run the whole stack on one machine: broker, gunicorn-served API, workers.

Started by ``./scripts/up``. Children run in their own sessions so that Ctrl-C
reaches only this supervisor, which then stops them in order: workers first
(they finish what they hold), then the API, then the broker.

With ``FORMULARY_AUTH=required`` (the default) the API wants a key: once the
broker answers, the key whose secret is in ``var/api-key`` is checked, and
when there is none (first start) or the broker does not know it (another
journal, ``:memory:``, revoked) a key ``local`` with every scope is made and
its secret written there, owner-only. Either way the supervisor says how to
use it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.apikeys import SCOPES, parse_secret  # noqa: E402
from broker.client import BrokerClient  # noqa: E402
from broker.errors import BrokerUnavailable, FormularyError  # noqa: E402
from broker.interface import ApiKey  # noqa: E402
from broker.settings import Settings  # noqa: E402

STOP_TIMEOUT = 40.0
API_KEY_FILE = Path("var/api-key")
LOCAL_KEY = "local"


def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    print(f"stack: starting {name}: {' '.join(argv)}", flush=True)
    return subprocess.Popen(argv, cwd=ROOT, start_new_session=True)


def wait_for_broker(settings: Settings, broker: subprocess.Popen[bytes], timeout: float) -> None:
    client = BrokerClient(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            raise SystemExit(f"stack: the broker exited with {broker.returncode}")
        try:
            client.ping()
            return
        except BrokerUnavailable:
            time.sleep(0.1)
    raise SystemExit("stack: the broker did not answer in time")


def ensure_api_key(settings: Settings, path: Path = API_KEY_FILE) -> ApiKey:
    """A key the broker knows, its secret in ``path`` (0600); made when there is none."""
    client = BrokerClient(settings)
    try:
        secret = path.read_text().strip() if path.exists() else ""
        known = parse_secret(secret)
        key = client.authenticate(*known) if known else None
        if key is None:
            made = client.create_key(LOCAL_KEY, SCOPES)
            write_secret(path, made.secret)
            key = made.key
            print(f"stack: made API key {key.name!r}, id {key.id}; its secret is in {path}")
        return key
    finally:
        client.close()


def usage(settings: Settings, key: ApiKey, path: Path = API_KEY_FILE) -> str:
    return (
        f"stack: API key {key.id} ({','.join(key.scopes)}): send it as\n"
        f'stack:   curl -H "Authorization: Bearer $(cat {path})" http://{settings.bind}/formulas'
    )


def write_secret(path: Path, secret: str) -> None:
    """``path`` holds ``secret`` and is readable by its owner only, from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    os.replace(partial, path)


def stop(name: str, process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"stack: {name} did not stop in {STOP_TIMEOUT:.0f}s; killing it", flush=True)
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--concurrency", type=int, default=1, help="threads per worker")
    args = parser.parse_args()

    settings = Settings.from_env()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    py = sys.executable
    broker = start("broker", [py, "-m", "broker"])
    wait_for_broker(settings, broker, timeout=30)
    key = None
    if settings.auth_required:
        try:
            key = ensure_api_key(settings)
        except (FormularyError, OSError, ValueError) as exc:
            print(f"stack: could not set up the API key: {exc!r}; stopping", flush=True)
            stop("broker", broker)
            return 1
    api = start("api", [py, "-m", "gunicorn", "-c", "gunicorn.conf.py"])
    workers = [
        start(f"worker {i}", [py, "-m", "worker", "--concurrency", str(args.concurrency)])
        for i in range(args.workers)
    ]
    children = {"broker": broker, "api": api} | {f"worker {i}": w for i, w in enumerate(workers)}
    print(f"stack: up. API on http://{settings.bind} ; Ctrl-C stops everything.", flush=True)
    if key is not None:
        print(usage(settings, key), flush=True)

    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"stack: {name} exited with {child.returncode}; stopping", flush=True)
                stopping, exit_code = True, 1
        time.sleep(0.2)

    print("stack: stopping", flush=True)
    for i, worker in enumerate(workers):
        stop(f"worker {i}", worker)
    stop("api", api)
    stop("broker", broker)
    print("stack: stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
