"""API keys in the PostgreSQL engine: the table ``formulary.api_keys``, read afresh on every call.

Nothing is cached in the broker, so a key made or revoked through any host's
admin socket holds on every host from its commit on. The table keeps the
SHA-256 of each secret (``broker.apikeys``), never the secret.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

from broker.apikeys import digest, matches, new_key_id, new_secret, parse_name, parse_scopes
from broker.engines.postgres import convert
from broker.engines.postgres.pool import Connection
from broker.engines.postgres.sql import query
from broker.errors import ApiKeyNotFound
from broker.interface import ApiKey, NewApiKey, rfc3339

__all__ = ["ApiKeyTable"]

log = logging.getLogger(__name__)


class ApiKeyTable:
    """The engine's API-key calls, each one statement on a connection from ``connect``."""

    def __init__(
        self, connect: Callable[[], contextlib.AbstractContextManager[Connection]]
    ) -> None:
        self._connect = connect

    def authenticate(self, key_id: str, secret_digest: str) -> ApiKey | None:
        if not (convert.is_text(key_id) and convert.is_text(secret_digest)):
            return None
        if not secret_digest.isascii():
            return None
        with self._connect() as connection:
            row = connection.execute(query("api_key"), {"key_id": key_id}).fetchone()
        if row is None or row[5] is not None or not matches(row[3], secret_digest):
            return None
        return convert.api_key(row)

    def create(self, name: str, scopes: Sequence[str]) -> NewApiKey:
        name, chosen = parse_name(name), parse_scopes(scopes)
        row = None
        with self._connect() as connection:
            while row is None:  # an id already taken gives no row: draw another
                key_id = new_key_id()
                secret = new_secret(key_id)
                row = connection.execute(
                    query("create_api_key"),
                    {
                        "key_id": key_id,
                        "name": name,
                        "scopes": list(chosen),
                        "secret_digest": digest(secret),
                    },
                ).fetchone()
        log.info("made API key %s (%r) with scopes %s", key_id, name, ",".join(chosen))
        key = ApiKey(key_id, name, chosen, rfc3339(row[0]), None)
        return NewApiKey(key, secret)

    def all(self) -> list[ApiKey]:
        with self._connect() as connection:
            rows = connection.execute(query("api_keys")).fetchall()
        return [convert.api_key(row) for row in rows]

    def revoke(self, key_id: str) -> None:
        if not convert.is_text(key_id):
            raise ApiKeyNotFound(key_id)
        with self._connect() as connection:
            row = connection.execute(query("revoke_api_key"), {"key_id": key_id}).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        log.info("revoked API key %s", key_id)
