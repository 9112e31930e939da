-- Version 2: API keys, and Idempotency-Keys that belong to the API key that sent them.

-- Who may call. The secret itself is never stored: secret_digest is its SHA-256
-- (broker.apikeys), compared in constant time by the broker. A revoked key
-- keeps its row (and its first revocation time), so the listing shows it.
CREATE TABLE formulary.api_keys (
    id            text        PRIMARY KEY,
    name          text        NOT NULL,
    -- Of broker.apikeys.SCOPES, in their canonical order.
    scopes        text[]      NOT NULL,
    secret_digest text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    revoked_at    timestamptz
);

-- An Idempotency-Key is its owner's: the id of the API key that sent it, or ''
-- (every key existing until now, and every one with FORMULARY_AUTH=off). The
-- same key string from two owners is two independent keys.
ALTER TABLE formulary.idempotency_keys ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE formulary.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE formulary.idempotency_keys ADD PRIMARY KEY (owner, key);

