-- Version 1: formulas, their messages, idempotency keys, and the live-message count.
--
-- Everything lives in the schema "formulary" (created by the migration runner),
-- so the database may hold other things beside it. The functions that make each
-- atomic step are in ../functions.sql, applied after the migrations.

-- A stored formula. "seq" orders the newest-first listing (keyset pagination);
-- "deliveries" counts every delivery over the formula's whole life (a redrive
-- does not reset it, unlike the message's own count).
CREATE TABLE formulary.formulas (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text        NOT NULL UNIQUE,
    name         text        NOT NULL,
    -- [{"name": ..., "concentration": <exact number>}, ...] as submitted (trimmed).
    materials    jsonb       NOT NULL,
    fingerprint  text        NOT NULL UNIQUE,
    message_id   text        NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL,
    deliveries   integer     NOT NULL DEFAULT 0,
    processed_at timestamptz,
    -- json, not jsonb: kept as the handler wrote it, key order included.
    summary      json
);

-- One row per message not yet acked (an ack deletes it). A message is
--   ready   visible from visible_at on (in the future: a delayed nack);
--   leased  held under lease_token until visible_at; once that has passed the
--           lease has expired and the message counts as ready again (or dead,
--           on its last allowed delivery) without any write;
--   dead    a dead letter, since dead_at.
-- Fresh messages (deliveries = 0) go in "seq" order; redeliveries (deliveries
-- > 0) in the order they became visible again, and ahead of fresh ones.
CREATE SEQUENCE formulary.message_seq;

CREATE TABLE formulary.messages (
    id          text        PRIMARY KEY,
    formula_id  text        NOT NULL REFERENCES formulary.formulas (id),
    fingerprint text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('ready', 'leased', 'dead')),
    visible_at  timestamptz NOT NULL,
    deliveries  integer     NOT NULL DEFAULT 0 CHECK (deliveries >= 0),
    lease_token text,
    consumer    text,
    seq         bigint      NOT NULL DEFAULT nextval('formulary.message_seq'),
    dead_at     timestamptz,
    CHECK ((state = 'leased') = (lease_token IS NOT NULL)),
    CHECK ((state = 'dead') = (dead_at IS NOT NULL))
);

-- Each index serves one ordered fetch and stops at its LIMIT.
CREATE INDEX messages_fresh ON formulary.messages (seq)
    WHERE state = 'ready' AND deliveries = 0;
CREATE INDEX messages_redelivery ON formulary.messages (visible_at, seq)
    WHERE state <> 'dead' AND deliveries > 0;
CREATE INDEX messages_dead ON formulary.messages (dead_at, seq)
    WHERE state = 'dead';

-- The first answer given to an Idempotency-Key: the formula it names, and
-- whether that answer was a 409. A row past expires_at is as good as absent.
CREATE TABLE formulary.idempotency_keys (
    key         text        PRIMARY KEY,
    body_digest text        NOT NULL,
    formula_id  text        NOT NULL REFERENCES formulary.formulas (id),
    duplicate   boolean     NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_expiry ON formulary.idempotency_keys (expires_at);

-- Live messages (ready, leased or delayed; not dead) and stored formulas, as
-- sums over a few slots. A connection changes only its own slot (its backend
-- pid modulo 16), so concurrent submits and acks rarely wait on one row; the
-- capacity check reads the committed sum (see formulary.submit).
CREATE TABLE formulary.counters (
    slot     integer PRIMARY KEY,
    live     bigint  NOT NULL DEFAULT 0,
    formulas bigint  NOT NULL DEFAULT 0
);

INSERT INTO formulary.counters (slot) SELECT generate_series(0, 15);
