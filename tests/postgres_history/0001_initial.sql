-- Version 1: formulas, their messages, idempotency keys, and the live-message count.
--
-- Everything lives in the schema "formulary" (created by the migration runner),
-- so the database may hold other things beside it.

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

-- Submit one formula: the whole of one atomic submit, in the caller's transaction.
--
-- outcome is 'accepted', 'replayed' (the key's first answer was a 202),
-- 'duplicate', 'duplicate_replayed' (the key's first answer was a 409),
-- 'key_reused' (the key came with another body) or 'full'; the other columns
-- describe the formula the answer names (none for 'key_reused' and 'full').
--
-- Nothing is written before the checks that can refuse, so a refusal needs no
-- undo and no subtransaction (hundreds of those in one transaction would
-- overflow every backend's subtransaction cache). The two races that are only
-- found while writing, another transaction inserting the same make-up or
-- claiming the same key first, wait for that transaction (the unique index
-- does), take back what this call wrote, and answer as the winner's answer
-- says.
--
-- Capacity: the count of live messages is read as committed, so submits
-- committing at the same instant on different connections may together pass
-- the capacity by at most the number of such connections.
CREATE FUNCTION formulary.submit(
    p_key text,
    p_body_digest text,
    p_key_ttl double precision,
    p_formula_id text,
    p_name text,
    p_materials jsonb,
    p_fingerprint text,
    p_message_id text,
    p_capacity bigint,
    OUT outcome text,
    OUT formula_id text,
    OUT name text,
    OUT materials jsonb,
    OUT fingerprint text,
    OUT message_id text,
    OUT created_at double precision
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_key formulary.idempotency_keys;
    v_formula formulary.formulas;
    v_slot integer := pg_backend_pid() % 16;
BEGIN
    FOR attempt IN 1..3 LOOP
        IF p_key IS NOT NULL THEN
            SELECT * INTO v_key FROM formulary.idempotency_keys k
             WHERE k.key = p_key AND k.expires_at > now();
            IF FOUND THEN
                IF v_key.body_digest <> p_body_digest THEN
                    outcome := 'key_reused';
                    RETURN;
                END IF;
                SELECT * INTO STRICT v_formula FROM formulary.formulas f WHERE f.id = v_key.formula_id;
                outcome := CASE WHEN v_key.duplicate THEN 'duplicate_replayed' ELSE 'replayed' END;
                EXIT;
            END IF;
        END IF;

        SELECT * INTO v_formula FROM formulary.formulas f WHERE f.fingerprint = p_fingerprint;
        IF FOUND THEN
            outcome := 'duplicate';
        ELSE
            UPDATE formulary.counters c SET live = c.live + 1, formulas = c.formulas + 1
             WHERE c.slot = v_slot
               AND (SELECT sum(c2.live) FROM formulary.counters c2) < p_capacity;
            IF NOT FOUND THEN
                outcome := 'full';
                RETURN;
            END IF;
            INSERT INTO formulary.formulas AS f
                   (id, name, materials, fingerprint, message_id, created_at)
            VALUES (p_formula_id, p_name, p_materials, p_fingerprint, p_message_id,
                    clock_timestamp())
            ON CONFLICT (fingerprint) DO NOTHING
            RETURNING * INTO v_formula;
            IF FOUND THEN
                outcome := 'accepted';
            ELSE
                -- Stored by a transaction that committed while we waited on it.
                UPDATE formulary.counters c SET live = c.live - 1, formulas = c.formulas - 1
                 WHERE c.slot = v_slot;
                SELECT * INTO STRICT v_formula FROM formulary.formulas f
                 WHERE f.fingerprint = p_fingerprint;
                outcome := 'duplicate';
            END IF;
        END IF;

        IF p_key IS NOT NULL THEN
            INSERT INTO formulary.idempotency_keys AS k
                   (key, body_digest, formula_id, duplicate, expires_at)
            VALUES (p_key, p_body_digest, v_formula.id, outcome = 'duplicate',
                    now() + make_interval(secs => p_key_ttl))
            ON CONFLICT (key) DO UPDATE
               SET body_digest = excluded.body_digest, formula_id = excluded.formula_id,
                   duplicate = excluded.duplicate, expires_at = excluded.expires_at
             WHERE k.expires_at <= now();
            IF NOT FOUND THEN
                -- Another transaction claimed the key and committed: its answer is ours.
                IF outcome = 'accepted' THEN
                    DELETE FROM formulary.formulas f WHERE f.id = p_formula_id;
                    UPDATE formulary.counters c SET live = c.live - 1, formulas = c.formulas - 1
                     WHERE c.slot = v_slot;
                END IF;
                CONTINUE;
            END IF;
        END IF;

        IF outcome = 'accepted' THEN
            INSERT INTO formulary.messages (id, formula_id, fingerprint, state, visible_at)
            VALUES (p_message_id, p_formula_id, p_fingerprint, 'ready', now());
            PERFORM pg_notify('formulary_messages', '');
        END IF;
        EXIT;
    END LOOP;
    IF outcome IS NULL THEN
        RAISE EXCEPTION 'idempotency key % changed hands three times in one submit', p_key;
    END IF;
    formula_id := v_formula.id;
    name := v_formula.name;
    materials := v_formula.materials;
    fingerprint := v_formula.fingerprint;
    message_id := v_formula.message_id;
    created_at := extract(epoch FROM v_formula.created_at);
END;
$$;

-- Dead-letter the messages whose last allowed delivery's lease has expired
-- (and any visible message past the limit, should the limit have been lowered).
-- Run at the start of every call that lists, counts or leases messages, so
-- that what it sees is settled; returns how many it buried.
CREATE FUNCTION formulary.bury_expired(p_max_deliveries integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_buried integer;
BEGIN
    WITH due AS (
        SELECT m.id FROM formulary.messages m
         WHERE m.state <> 'dead' AND m.deliveries > 0 AND m.visible_at <= now()
           AND m.deliveries >= p_max_deliveries
         ORDER BY m.visible_at, m.seq
           FOR UPDATE SKIP LOCKED
    )
    UPDATE formulary.messages m
       SET state = 'dead', dead_at = m.visible_at, lease_token = NULL, consumer = NULL
      FROM due WHERE m.id = due.id;
    GET DIAGNOSTICS v_buried = ROW_COUNT;
    IF v_buried > 0 THEN
        UPDATE formulary.counters c SET live = c.live - v_buried
         WHERE c.slot = pg_backend_pid() % 16;
    END IF;
    RETURN v_buried;
END;
$$;

-- Lease up to p_max visible messages: redeliveries first, in the order they
-- became visible again, then fresh messages in publish order. Locked rows
-- (another broker leasing them now) are skipped, never waited on.
CREATE FUNCTION formulary.lease(
    p_consumer text,
    p_max integer,
    p_lease_seconds double precision,
    p_max_deliveries integer
) RETURNS TABLE (
    message_id text,
    formula_id text,
    fingerprint text,
    lease_token text,
    deliveries integer,
    lease_expires_at double precision,
    redelivery boolean,
    visible_since timestamptz,
    seq bigint
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_until timestamptz := now() + make_interval(secs => p_lease_seconds);
    v_found integer;
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT m.id, m.visible_at AS since FROM formulary.messages m
         WHERE m.state <> 'dead' AND m.deliveries > 0 AND m.visible_at <= now()
           AND m.deliveries < p_max_deliveries
         ORDER BY m.visible_at, m.seq
         LIMIT p_max
           FOR UPDATE SKIP LOCKED
    )
    UPDATE formulary.messages m
       SET state = 'leased', deliveries = m.deliveries + 1, visible_at = v_until,
           lease_token = replace(gen_random_uuid()::text, '-', ''), consumer = p_consumer
      FROM due WHERE m.id = due.id
    RETURNING m.id, m.formula_id, m.fingerprint, m.lease_token, m.deliveries,
              extract(epoch FROM v_until)::double precision, true, due.since, m.seq;
    GET DIAGNOSTICS v_found = ROW_COUNT;
    IF v_found < p_max THEN
        RETURN QUERY
        WITH fresh AS (
            SELECT m.id, m.visible_at AS since FROM formulary.messages m
             WHERE m.state = 'ready' AND m.deliveries = 0
             ORDER BY m.seq
             LIMIT p_max - v_found
               FOR UPDATE SKIP LOCKED
        )
        UPDATE formulary.messages m
           SET state = 'leased', deliveries = 1, visible_at = v_until,
               lease_token = replace(gen_random_uuid()::text, '-', ''), consumer = p_consumer
          FROM fresh WHERE m.id = fresh.id
        RETURNING m.id, m.formula_id, m.fingerprint, m.lease_token, m.deliveries,
                  extract(epoch FROM v_until)::double precision, false, fresh.since, m.seq;
    END IF;
END;
$$;

-- The message a receipt names, locked, if the receipt is its current lease.
-- outcome: 'current', 'gone' (acked before: no row) or 'stale'.
CREATE FUNCTION formulary.check_lease(p_message_id text, p_token text, OUT outcome text,
                                      OUT msg formulary.messages)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT * INTO msg FROM formulary.messages m WHERE m.id = p_message_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'gone';
    ELSIF msg.state = 'leased' AND msg.lease_token = p_token AND msg.visible_at > now() THEN
        outcome := 'current';
    ELSE
        outcome := 'stale';
    END IF;
END;
$$;

-- Record a handler's result (the first one wins) and ack, as one step.
-- outcome: 'recorded' (result stored and acked), 'acked' (acked; the formula
-- had a result already), 'gone' or 'stale' (nothing changed).
CREATE FUNCTION formulary.complete(p_message_id text, p_token text, p_summary json)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_check record;
BEGIN
    SELECT * INTO v_check FROM formulary.check_lease(p_message_id, p_token);
    IF v_check.outcome <> 'current' THEN
        RETURN v_check.outcome;
    END IF;
    DELETE FROM formulary.messages m WHERE m.id = p_message_id;
    UPDATE formulary.counters c SET live = c.live - 1 WHERE c.slot = pg_backend_pid() % 16;
    IF p_summary IS NULL THEN
        RETURN 'acked';
    END IF;
    UPDATE formulary.formulas f SET processed_at = clock_timestamp(), summary = p_summary
     WHERE f.id = (v_check.msg).formula_id AND f.processed_at IS NULL;
    RETURN CASE WHEN FOUND THEN 'recorded' ELSE 'acked' END;
END;
$$;

-- Give a leased message back: visible again after p_delay seconds, or
-- dead-lettered on its last allowed delivery. outcome: 'ready', 'delayed',
-- 'dead', 'gone' or 'stale'.
CREATE FUNCTION formulary.nack(p_message_id text, p_token text, p_delay double precision,
                               p_max_deliveries integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_check record;
BEGIN
    SELECT * INTO v_check FROM formulary.check_lease(p_message_id, p_token);
    IF v_check.outcome <> 'current' THEN
        RETURN v_check.outcome;
    END IF;
    IF (v_check.msg).deliveries >= p_max_deliveries THEN
        UPDATE formulary.messages m
           SET state = 'dead', dead_at = now(), lease_token = NULL, consumer = NULL
         WHERE m.id = p_message_id;
        UPDATE formulary.counters c SET live = c.live - 1 WHERE c.slot = pg_backend_pid() % 16;
        RETURN 'dead';
    END IF;
    UPDATE formulary.messages m
       SET state = 'ready', visible_at = now() + make_interval(secs => greatest(p_delay, 0)),
           lease_token = NULL, consumer = NULL
     WHERE m.id = p_message_id;
    IF p_delay > 0 THEN
        RETURN 'delayed';
    END IF;
    PERFORM pg_notify('formulary_messages', '');
    RETURN 'ready';
END;
$$;

-- Send dead letters back to the tail of the fresh messages, oldest first,
-- with their delivery count at 0; p_message_id NULL for all of them.
CREATE FUNCTION formulary.redrive(p_message_id text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_dead record;
    v_count integer := 0;
BEGIN
    FOR v_dead IN
        SELECT m.id FROM formulary.messages m
         WHERE m.state = 'dead' AND (p_message_id IS NULL OR m.id = p_message_id)
         ORDER BY m.dead_at, m.seq
           FOR UPDATE
    LOOP
        UPDATE formulary.messages m
           SET state = 'ready', deliveries = 0, visible_at = now(), dead_at = NULL,
               seq = nextval('formulary.message_seq')
         WHERE m.id = v_dead.id;
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 THEN
        UPDATE formulary.counters c SET live = c.live + v_count
         WHERE c.slot = pg_backend_pid() % 16;
        PERFORM pg_notify('formulary_messages', '');
    END IF;
    RETURN v_count;
END;
$$;
