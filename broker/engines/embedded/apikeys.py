"""API keys in the embedded engine: each key's record, by id, in the order the keys were made.

A record holds the SHA-256 of the key's secret (``broker.apikeys``), never the
secret. A plain dictionary, no locking: the engine's facade (``service``) holds
its lock around every call. ``get``, ``put`` and ``check`` are O(1); ``all``
is O(keys), and there are few.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.apikeys import matches
from broker.interface import ApiKey, rfc3339

__all__ = ["ApiKeyRecord", "ApiKeys"]


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One key as the engine keeps and journals it. Times are wall-clock epoch seconds."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    secret_digest: str
    created_at: float
    revoked_at: float | None = None

    def view(self) -> ApiKey:
        return ApiKey(
            id=self.key_id,
            name=self.name,
            scopes=self.scopes,
            created_at=rfc3339(self.created_at),
            revoked_at=None if self.revoked_at is None else rfc3339(self.revoked_at),
        )


class ApiKeys:
    def __init__(self) -> None:
        self._by_id: dict[str, ApiKeyRecord] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, key_id: object) -> ApiKeyRecord | None:
        # Ids cross the manager from a client: they may be anything.
        return self._by_id.get(key_id) if isinstance(key_id, str) else None

    def put(self, record: ApiKeyRecord) -> None:
        """Add a key, or replace its record (a revocation keeps the key's place)."""
        self._by_id[record.key_id] = record

    def all(self) -> list[ApiKeyRecord]:
        """Every key, revoked ones included, oldest first."""
        return list(self._by_id.values())

    def check(self, key_id: object, secret_digest: object) -> ApiKeyRecord | None:
        """The live key ``key_id`` if ``secret_digest`` is its secret's; None otherwise.

        The digests are compared in constant time; an unknown or revoked key
        answers at once, since key ids are no secret (logs name them).
        """
        record = self.get(key_id)
        if record is None or record.revoked_at is not None:
            return None
        if not isinstance(secret_digest, str) or not secret_digest.isascii():
            return None
        return record if matches(record.secret_digest, secret_digest) else None
