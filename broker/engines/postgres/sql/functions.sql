-- Every function of the schema "formulary": the atomic steps the engine calls,
-- each run as one statement (one transaction), and what they share.
--
-- Not a versioned migration. The broker applies this file at start, under the
-- migration lock and after the versioned migrations, whenever its checksum
-- differs from the one recorded in formulary.schema_functions (schema.py):
-- first it drops every function of the schema, so that one renamed, removed or
-- given other arguments leaves nothing behind, then it runs this file, all in
-- one transaction. Change a function here, in place; tables, indexes and data
-- changes go in migrations/.

-- Submit one formula: the whole of one atomic submit, in the caller's transaction.
--
-- p_key (NULL for none) is p_owner's Idempotency-Key: looked up and recorded
-- by (p_owner, p_key), so another owner's key of the same spelling is never
-- seen.
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
-- Capacity: the count of live messages is read as committed (with this
-- transaction's own), so transactions committing at the same instant on
-- different connections may each fill the room they saw: together they pass
-- the capacity by at most that room times their number less one.
CREATE FUNCTION formulary.submit(
    p_owner text,
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
    v_answered boolean := false;
BEGIN
    FOR attempt IN 1..3 LOOP
        outcome := NULL;
        IF p_key IS NOT NULL THEN
            SELECT * INTO v_key FROM formulary.idempotency_keys k
             WHERE k.owner = p_owner AND k.key = p_key AND k.expires_at > now();
            IF FOUND THEN
                IF v_key.body_digest <> p_body_digest THEN
                    outcome := 'key_reused';
                    RETURN;
                END IF;
                SELECT * INTO STRICT v_formula FROM formulary.formulas f WHERE f.id = v_key.formula_id;
                outcome := CASE WHEN v_key.duplicate THEN 'duplicate_replayed' ELSE 'replayed' END;
                v_answered := true;
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
                -- Full as committed now; but the make-up we did not find at first
                -- may be one of what filled it, and then the answer is its 409.
                SELECT * INTO v_formula FROM formulary.formulas f
                 WHERE f.fingerprint = p_fingerprint;
                IF NOT FOUND THEN
                    outcome := 'full';
                    RETURN;
                END IF;
                outcome := 'duplicate';
            END IF;
        END IF;

        IF outcome IS NULL THEN
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
                   (owner, key, body_digest, formula_id, duplicate, expires_at)
            VALUES (p_owner, p_key, p_body_digest, v_formula.id, outcome = 'duplicate',
                    now() + make_interval(secs => p_key_ttl))
            ON CONFLICT (owner, key) DO UPDATE
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
        v_answered := true;
        EXIT;
    END LOOP;
    IF NOT v_answered THEN
        RAISE EXCEPTION 'idempotency key % of owner % changed hands three times in one submit',
            p_key, quote_literal(p_owner);
    END IF;
    formula_id := v_formula.id;
    name := v_formula.name;
    materials := v_formula.materials;
    fingerprint := v_formula.fingerprint;
    message_id := v_formula.message_id;
    created_at := extract(epoch FROM v_formula.created_at);
END;
$$;

-- A group of submits, in order, as one transaction: one commit (one WAL flush)
-- for the group, and each submit answered as if it ran alone after the ones
-- before it. p_group is a JSON array, one object per submit (broker/engines/
-- postgres/convert.py writes it): one parameter, however large the group,
-- instead of an array per field, which cost the broker more to send than the
-- submit itself. ord numbers the answers. Materials come back only for a
-- replayed 202: the broker has them for a new formula, and a 409 does not show
-- them.
--
-- A group of two or more submits whose Idempotency-Keys (if any) are all
-- different and none of them known yet is stored by one INSERT of its new
-- make-ups (and of their messages) and answered by one SELECT, with the same
-- answers as formulary.submit for each in turn; then its keys are recorded
-- with the answers they got. Should another transaction claim one of those
-- keys meanwhile, the whole group fails with serialization_failure, and the
-- broker runs each submit again alone. Any other group (a single submit,
-- which costs the database less this way; a key repeated or already known,
-- to be replayed) runs formulary.submit for each submit.
--
-- The new make-ups are those no stored formula has, each taken at its first
-- submit in the group; as many of them as the queue has room for, in group
-- order, are stored. A make-up another transaction stores meanwhile is left to
-- it (the unique index waits for that transaction): the answers are read
-- afterwards, in a statement of their own that sees what committed, so each
-- submit is answered by the formula that now holds its make-up: its own
-- (202), another's (409), or none (the queue was full). Capacity is as in
-- formulary.submit, except that room counted for a make-up another
-- transaction stored first is not given to a later submit of the group: that
-- one is refused (503) where one at a time it might have fitted.
--
-- Groups racing on the same new make-ups cannot deadlock here: each inserts
-- its formulas in fingerprint order, so whichever waits on another's make-up
-- holds none that the other still has to insert. The formulas still number
-- (seq) and date in group order, and their messages queue in it.
--
-- Every lookup of a formula, by fingerprint or by id, is a scalar subquery or
-- a LATERAL ... LIMIT 1 on purpose: written as NOT EXISTS or a join, the
-- planner may hash the whole formulas table for a group of a few rows, and a
-- plan cached while the table was small goes on doing so as it grows
-- (tests/test_postgres_plans.py).
CREATE FUNCTION formulary.submit_many(
    p_group jsonb,
    p_key_ttl double precision,
    p_capacity bigint
) RETURNS TABLE (
    ord integer,
    outcome text,
    formula_id text,
    name text,
    materials jsonb,
    fingerprint text,
    message_id text,
    created_at double precision
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_submit record;
    v_room bigint;
    v_stored integer;
    v_keys bigint := 0;
    v_fresh_keys bigint := 0;
    v_unclaimed bigint;
    v_holders text[];
BEGIN
    IF jsonb_path_exists(p_group, '$[*] ? (@.key != null)') THEN
        SELECT count(*), count(DISTINCT (g.owner, g.key)) FILTER (
                   WHERE NOT EXISTS (SELECT FROM formulary.idempotency_keys k
                                      WHERE k.owner = g.owner AND k.key = g.key
                                        AND k.expires_at > now()))
          INTO v_keys, v_fresh_keys
          FROM jsonb_to_recordset(p_group) AS g(owner text, key text)
         WHERE g.key IS NOT NULL;
    END IF;
    IF jsonb_array_length(p_group) > 1 AND v_fresh_keys = v_keys THEN
        SELECT p_capacity - sum(c.live) INTO v_room FROM formulary.counters c;
        WITH submits AS (
            SELECT * FROM ROWS FROM (jsonb_to_recordset(p_group) AS (
                     formula_id text, name text, materials jsonb, fingerprint text, message_id text))
                 WITH ORDINALITY AS g
        ), new_makeups AS (
            SELECT DISTINCT ON (s.fingerprint) s.*
              FROM submits s
             WHERE (SELECT f.seq FROM formulary.formulas f
                     WHERE f.fingerprint = s.fingerprint LIMIT 1) IS NULL
             ORDER BY s.fingerprint, s.ordinality
        ), room AS (
            SELECT n.*, nextval(pg_get_serial_sequence('formulary.formulas', 'seq')) AS seq,
                   clock_timestamp() AS created_at
              FROM (SELECT * FROM new_makeups n ORDER BY n.ordinality
                     LIMIT greatest(v_room, 0)) n
        ), stored AS (
            INSERT INTO formulary.formulas AS f
                   (seq, id, name, materials, fingerprint, message_id, created_at)
            OVERRIDING SYSTEM VALUE
            SELECT r.seq, r.formula_id, r.name, r.materials, r.fingerprint, r.message_id,
                   r.created_at
              FROM room r ORDER BY r.fingerprint
            ON CONFLICT (fingerprint) DO NOTHING
            RETURNING f.id, f.fingerprint, f.message_id
        ), published AS (
            INSERT INTO formulary.messages (id, formula_id, fingerprint, state, visible_at)
            SELECT s.message_id, s.id, s.fingerprint, 'ready', now()
              FROM stored s JOIN room r ON r.formula_id = s.id
             ORDER BY r.ordinality
            RETURNING 1
        )
        SELECT count(*) INTO v_stored FROM published;
        IF v_stored > 0 THEN
            UPDATE formulary.counters c SET live = c.live + v_stored, formulas = c.formulas + v_stored
             WHERE c.slot = pg_backend_pid() % 16;
            PERFORM pg_notify('formulary_messages', '');
        END IF;
        -- Which formula answers each submit, read once: the answers and the keys
        -- must agree even if a make-up refused as full is stored meanwhile.
        SELECT array_agg(f.id ORDER BY s.ordinality) INTO v_holders
          FROM ROWS FROM (jsonb_to_recordset(p_group) AS (fingerprint text)) WITH ORDINALITY AS s
          LEFT JOIN LATERAL (SELECT f.id FROM formulary.formulas f
                              WHERE f.fingerprint = s.fingerprint LIMIT 1) f ON true;
        RETURN QUERY
            SELECT s.ordinality::integer,
                   CASE WHEN f.id IS NULL THEN 'full'
                        WHEN f.id = s.formula_id THEN 'accepted'
                        ELSE 'duplicate' END,
                   f.id, f.name, NULL::jsonb, f.fingerprint, f.message_id,
                   extract(epoch FROM f.created_at)::double precision
              FROM ROWS FROM (jsonb_to_recordset(p_group) AS (formula_id text))
                   WITH ORDINALITY AS s
              LEFT JOIN LATERAL (SELECT * FROM formulary.formulas f
                                  WHERE f.id = v_holders[s.ordinality] LIMIT 1) f ON true
             ORDER BY s.ordinality;
        IF v_keys > 0 THEN
            -- A refused submit (the queue full) keeps no key, so its retry is a new try.
            WITH answered AS (
                SELECT g.owner, g.key, g.body_digest, v_holders[g.ordinality] AS holder,
                       v_holders[g.ordinality] <> g.formula_id AS duplicate
                  FROM ROWS FROM (jsonb_to_recordset(p_group)
                       AS (owner text, key text, body_digest text, formula_id text))
                       WITH ORDINALITY AS g
                 WHERE g.key IS NOT NULL AND v_holders[g.ordinality] IS NOT NULL
            ), claimed AS (
                INSERT INTO formulary.idempotency_keys AS k
                       (owner, key, body_digest, formula_id, duplicate, expires_at)
                SELECT a.owner, a.key, a.body_digest, a.holder, a.duplicate,
                       now() + make_interval(secs => p_key_ttl)
                  FROM answered a ORDER BY a.owner, a.key
                ON CONFLICT (owner, key) DO UPDATE
                   SET body_digest = excluded.body_digest, formula_id = excluded.formula_id,
                       duplicate = excluded.duplicate, expires_at = excluded.expires_at
                 WHERE k.expires_at <= now()
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM answered) - (SELECT count(*) FROM claimed) INTO v_unclaimed;
            IF v_unclaimed > 0 THEN
                RAISE EXCEPTION 'an idempotency key of this group was claimed meanwhile'
                      USING ERRCODE = 'serialization_failure';
            END IF;
        END IF;
        RETURN;
    END IF;
    FOR v_submit IN
        SELECT * FROM ROWS FROM (jsonb_to_recordset(p_group) AS (
                 owner text, key text, body_digest text, formula_id text, name text,
                 materials jsonb, fingerprint text, message_id text)) WITH ORDINALITY AS g
         ORDER BY g.ordinality
    LOOP
        ord := v_submit.ordinality;
        SELECT s.outcome, s.formula_id, s.name,
               CASE WHEN s.outcome = 'replayed' THEN s.materials END,
               s.fingerprint, s.message_id, s.created_at
          INTO outcome, formula_id, name, materials, fingerprint, message_id, created_at
          FROM formulary.submit(v_submit.owner, v_submit.key, v_submit.body_digest, p_key_ttl,
                                v_submit.formula_id, v_submit.name, v_submit.materials,
                                v_submit.fingerprint, v_submit.message_id, p_capacity) s;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Formulas with their processing state as clients see it: 'failed' once the
-- message is dead, or on its last allowed delivery with the lease run out.
-- LANGUAGE sql and STABLE, so the planner inlines it into the calling query
-- and the caller's WHERE, ORDER BY and LIMIT use the indexes of formulas.
CREATE FUNCTION formulary.formula_views(p_max_deliveries integer)
RETURNS TABLE (
    id text,
    name text,
    materials jsonb,
    fingerprint text,
    message_id text,
    created_at double precision,
    status text,
    deliveries integer,
    processed_at double precision,
    summary json,
    seq bigint
) LANGUAGE sql STABLE AS $$
    SELECT f.id, f.name, f.materials, f.fingerprint, f.message_id,
           extract(epoch FROM f.created_at)::double precision,
           CASE WHEN f.processed_at IS NOT NULL THEN 'processed'
                WHEN m.state = 'dead'
                  OR (m.deliveries >= p_max_deliveries AND m.visible_at <= now()) THEN 'failed'
                ELSE 'queued' END,
           f.deliveries,
           extract(epoch FROM f.processed_at)::double precision,
           f.summary,
           f.seq
      FROM formulary.formulas f
      LEFT JOIN formulary.messages m ON m.id = f.message_id
$$;

-- Dead-letter the messages whose last allowed delivery's lease has expired
-- (and any visible message past the limit, should the limit have been lowered).
-- Run at the start of every call that lists, counts or leases messages, so
-- that what it sees is settled; returns how many it buried. Each is updated
-- by its id: joined to the list of due messages instead, a plan cached while
-- the queue was small would read the whole queue on every call.
CREATE FUNCTION formulary.bury_expired(p_max_deliveries integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_due record;
    v_buried integer := 0;
BEGIN
    FOR v_due IN
        SELECT m.id FROM formulary.messages m
         WHERE m.state <> 'dead' AND m.deliveries > 0 AND m.visible_at <= now()
           AND m.deliveries >= p_max_deliveries
         ORDER BY m.visible_at, m.seq
           FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE formulary.messages m
           SET state = 'dead', dead_at = m.visible_at, lease_token = NULL, consumer = NULL
         WHERE m.id = v_due.id;
        v_buried := v_buried + 1;
    END LOOP;
    IF v_buried > 0 THEN
        UPDATE formulary.counters c SET live = c.live - v_buried
         WHERE c.slot = pg_backend_pid() % 16;
    END IF;
    RETURN v_buried;
END;
$$;

-- Lease up to p_max visible messages: redeliveries first, in the order they
-- became visible again, then fresh messages in publish order. Locked rows
-- (another broker leasing them now) are skipped, never waited on. Each
-- delivery is counted on its formula (its whole-life count) in the same
-- statement.
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
    ), leased AS (
        UPDATE formulary.messages m
           SET state = 'leased', deliveries = m.deliveries + 1, visible_at = v_until,
               lease_token = replace(gen_random_uuid()::text, '-', ''), consumer = p_consumer
          FROM due WHERE m.id = due.id
        RETURNING m.id AS l_id, m.formula_id AS l_formula, m.fingerprint AS l_fingerprint,
                  m.lease_token AS l_token, m.deliveries AS l_deliveries,
                  due.since AS l_since, m.seq AS l_seq
    ), counted AS (
        UPDATE formulary.formulas f SET deliveries = f.deliveries + 1
          FROM leased WHERE f.id = leased.l_formula
    )
    SELECT l_id, l_formula, l_fingerprint, l_token, l_deliveries,
           extract(epoch FROM v_until)::double precision, true, l_since, l_seq
      FROM leased;
    GET DIAGNOSTICS v_found = ROW_COUNT;
    IF v_found < p_max THEN
        RETURN QUERY
        WITH fresh AS (
            SELECT m.id, m.visible_at AS since FROM formulary.messages m
             WHERE m.state = 'ready' AND m.deliveries = 0
             ORDER BY m.seq
             LIMIT p_max - v_found
               FOR UPDATE SKIP LOCKED
        ), leased AS (
            UPDATE formulary.messages m
               SET state = 'leased', deliveries = 1, visible_at = v_until,
                   lease_token = replace(gen_random_uuid()::text, '-', ''),
                   consumer = p_consumer
              FROM fresh WHERE m.id = fresh.id
            RETURNING m.id AS l_id, m.formula_id AS l_formula, m.fingerprint AS l_fingerprint,
                      m.lease_token AS l_token, m.deliveries AS l_deliveries,
                      fresh.since AS l_since, m.seq AS l_seq
        ), counted AS (
            UPDATE formulary.formulas f SET deliveries = f.deliveries + 1
              FROM leased WHERE f.id = leased.l_formula
        )
        SELECT l_id, l_formula, l_fingerprint, l_token, l_deliveries,
               extract(epoch FROM v_until)::double precision, false, l_since, l_seq
          FROM leased;
    END IF;
END;
$$;

-- Lock the message a receipt names and say whether the receipt is its current
-- lease: 'current', 'gone' (acked before: no row) or 'stale'. The steps that
-- settle a lease (complete, nack) start here, and change nothing unless the
-- answer is 'current'.
CREATE FUNCTION formulary.check_lease(p_message_id text, p_token text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_msg formulary.messages;
BEGIN
    SELECT * INTO v_msg FROM formulary.messages m WHERE m.id = p_message_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'gone';
    ELSIF v_msg.state = 'leased' AND v_msg.lease_token = p_token AND v_msg.visible_at > now() THEN
        RETURN 'current';
    END IF;
    RETURN 'stale';
END;
$$;

-- Record a handler's result (the first one wins) and ack, as one step.
-- outcome: 'recorded' (result stored and acked), 'acked' (acked; the formula
-- had a result already, or p_summary is NULL), 'gone' or 'stale' (nothing
-- changed).
CREATE FUNCTION formulary.complete(p_message_id text, p_token text, p_summary json)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_outcome text := formulary.check_lease(p_message_id, p_token);
    v_formula_id text;
BEGIN
    IF v_outcome <> 'current' THEN
        RETURN v_outcome;
    END IF;
    DELETE FROM formulary.messages m WHERE m.id = p_message_id
    RETURNING m.formula_id INTO v_formula_id;
    UPDATE formulary.counters c SET live = c.live - 1 WHERE c.slot = pg_backend_pid() % 16;
    IF p_summary IS NULL THEN
        RETURN 'acked';
    END IF;
    UPDATE formulary.formulas f SET processed_at = clock_timestamp(), summary = p_summary
     WHERE f.id = v_formula_id AND f.processed_at IS NULL;
    RETURN CASE WHEN FOUND THEN 'recorded' ELSE 'acked' END;
END;
$$;

-- A batch of results and acks, in order, as one transaction: formulary.complete
-- for each (a NULL summary acks without recording). The answers come in order.
CREATE FUNCTION formulary.complete_many(p_message_ids text[], p_tokens text[],
                                        p_summaries json[])
RETURNS TABLE (ord integer, outcome text) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..coalesce(array_length(p_message_ids, 1), 0) LOOP
        ord := i;
        outcome := formulary.complete(p_message_ids[i], p_tokens[i], p_summaries[i]);
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Give a leased message back: visible again after p_delay seconds, or
-- dead-lettered on its last allowed delivery. outcome: 'ready', 'delayed',
-- 'dead', 'gone' or 'stale'.
CREATE FUNCTION formulary.nack(p_message_id text, p_token text, p_delay double precision,
                               p_max_deliveries integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_outcome text := formulary.check_lease(p_message_id, p_token);
BEGIN
    IF v_outcome <> 'current' THEN
        RETURN v_outcome;
    END IF;
    UPDATE formulary.messages m
       SET state = 'dead', dead_at = now(), lease_token = NULL, consumer = NULL
     WHERE m.id = p_message_id AND m.deliveries >= p_max_deliveries;
    IF FOUND THEN
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
