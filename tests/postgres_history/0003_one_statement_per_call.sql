-- Version 3: each broker call is one statement, so it needs no BEGIN and COMMIT
-- round trips of its own (the pool's connections run in autocommit; a
-- statement, and every function it calls, is one transaction).

-- A group of submits, in order, as one transaction: formulary.submit for each,
-- each seeing the ones before it; one commit (one WAL flush) for the group.
-- The arrays are parallel, one element per submit; ord numbers the answers.
CREATE FUNCTION formulary.submit_many(
    p_owners text[],
    p_keys text[],
    p_body_digests text[],
    p_key_ttl double precision,
    p_formula_ids text[],
    p_names text[],
    p_materials jsonb[],
    p_fingerprints text[],
    p_message_ids text[],
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
BEGIN
    FOR i IN 1..coalesce(array_length(p_formula_ids, 1), 0) LOOP
        ord := i;
        SELECT s.outcome, s.formula_id, s.name, s.materials, s.fingerprint, s.message_id,
               s.created_at
          INTO outcome, formula_id, name, materials, fingerprint, message_id, created_at
          FROM formulary.submit(p_owners[i], p_keys[i], p_body_digests[i], p_key_ttl,
                                p_formula_ids[i], p_names[i], p_materials[i],
                                p_fingerprints[i], p_message_ids[i], p_capacity) s;
        RETURN NEXT;
    END LOOP;
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

-- Leasing now also counts each delivery on its formula (its whole-life count)
-- in the same statement, instead of in a second one.
CREATE OR REPLACE FUNCTION formulary.lease(
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
