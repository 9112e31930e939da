"""Configuration, in one place: read once from the environment, then passed down.

Every setting has a default that works on one machine. The ``FORMULARY_*`` names
are fixed by the SPEC because operators and scripts depend on them. No other
module reads ``FORMULARY_*`` variables; the one other variable read is
prometheus_client's own ``PROMETHEUS_MULTIPROC_DIR``, which
``gunicorn.conf.py`` sets and ``api/metrics.py`` must agree with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

PREFIX = "FORMULARY_"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
DEFAULT_HANDLER = "worker.handlers:summarise"


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    broker_address: str = "var/broker.sock"
    authkey_file: Path = Path("var/authkey")
    authkey_hex: str | None = field(default=None, repr=False)
    data: str = "var/formulary.sqlite3"
    admin_socket: Path = Path("var/admin.sock")
    bind: str = "127.0.0.1:8000"
    web_workers: int = 2
    web_connections: int = 1000
    read_timeout: float = 10.0
    queue_capacity: int = 100_000
    visibility_timeout: float = 30.0
    max_deliveries: int = 5
    handler: str = DEFAULT_HANDLER
    idempotency_ttl: float = 24 * 3600.0
    auth: str = "required"
    rate_limit: float | None = None
    """Requests per second each API key may make (burst: as many); None for no limit."""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(PREFIX + name)
            return value if value not in (None, "") else None

        base = cls()
        values: dict[str, object] = {}
        for name, parse in _PARSERS.items():
            raw = get(name.upper())
            if raw is not None:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise SettingsError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from None
        authkey = get("AUTHKEY")
        if authkey is not None:
            try:
                bytes.fromhex(authkey)
            except ValueError:
                raise SettingsError(f"{PREFIX}AUTHKEY must be hex") from None
            values["authkey_hex"] = authkey
        settings = replace(base, **values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if self.queue_capacity < 1:
            raise SettingsError(f"{PREFIX}QUEUE_CAPACITY must be at least 1")
        if self.visibility_timeout <= 0:
            raise SettingsError(f"{PREFIX}VISIBILITY_TIMEOUT must be positive")
        if self.web_connections < 1:
            raise SettingsError(f"{PREFIX}WEB_CONNECTIONS must be at least 1")
        if self.max_deliveries < 1:
            raise SettingsError(f"{PREFIX}MAX_DELIVERIES must be at least 1")
        if ":" not in self.handler:
            raise SettingsError(f"{PREFIX}HANDLER must look like module:function")
        if self.auth not in AUTH_MODES:
            raise SettingsError(f"{PREFIX}AUTH must be one of {', '.join(AUTH_MODES)}")

    @property
    def auth_required(self) -> bool:
        return self.auth == "required"

    @property
    def in_memory(self) -> bool:
        return self.data == ":memory:"

    @property
    def uses_tcp(self) -> bool:
        """``host:port`` means TCP; anything else is a Unix socket path."""
        return parse_host_port(self.broker_address) is not None

    def manager_address(self) -> str | tuple[str, int]:
        hostport = parse_host_port(self.broker_address)
        return hostport if hostport is not None else self.broker_address


def parse_host_port(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:5000"`` -> ``("127.0.0.1", 5000)``; a path -> ``None``."""
    if "/" in value or ":" not in value:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


AUTH_MODES = ("required", "off")


def _rate(raw: str) -> float:
    """``"50/s"`` -> 50.0."""
    number, slash, unit = raw.strip().partition("/")
    if not slash or unit.strip() != "s":
        raise ValueError("must look like N/s, such as 50/s")
    value = float(number)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of requests per second")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


_PARSERS: dict[str, Callable[[str], object]] = {
    "broker_address": str,
    "authkey_file": Path,
    "data": str,
    "admin_socket": Path,
    "bind": str,
    "web_workers": int,
    "web_connections": int,
    "read_timeout": _positive_float,
    "queue_capacity": int,
    "visibility_timeout": _positive_float,
    "max_deliveries": int,
    "handler": str,
    "idempotency_ttl": _positive_float,
    "auth": str.lower,
    "rate_limit": _rate,
    "log_level": str.upper,
}


def configure_logging(settings: Settings) -> None:
    """Every process's own log lines: stderr, one format, at ``FORMULARY_LOG_LEVEL``."""
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
