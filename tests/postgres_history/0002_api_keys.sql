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

DROP FUNCTION formulary.submit(text, text, double precision, text, text, jsonb, text, text,
                               bigint);

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
-- Capacity: the count of live messages is read as committed, so submits
-- committing at the same instant on different connections may together pass
-- the capacity by at most the number of such connections.
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
