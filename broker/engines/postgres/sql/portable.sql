-- Copying a whole deployment out of or into the database (broker.migrate;
-- broker/engines/postgres/portable.py). Named as in queries.sql: each starts
-- with "-- name: NAME" and runs as one statement.
--
-- Out: every read runs in one REPEATABLE READ, READ ONLY transaction, so the
-- copy is one consistent snapshot. In: everything runs in one transaction on
-- a database with nothing stored, so a failed copy leaves it empty.

-- name: schema_found
-- The Formulary schema's version, or NULL if the database holds none.
SELECT CASE WHEN to_regclass('formulary.schema_version') IS NOT NULL
            THEN (SELECT max(v.version) FROM formulary.schema_version v) END;

-- name: holdings
-- What the database holds: formulas, idempotency keys alive and expired,
-- messages (live and dead), dead letters, API keys (revoked ones included).
SELECT (SELECT count(*) FROM formulary.formulas),
       (SELECT count(*) FROM formulary.idempotency_keys k WHERE k.expires_at > now()),
       (SELECT count(*) FROM formulary.idempotency_keys k WHERE k.expires_at <= now()),
       (SELECT count(*) FROM formulary.messages),
       (SELECT count(*) FROM formulary.messages m WHERE m.state = 'dead'),
       (SELECT count(*) FROM formulary.api_keys);

-- name: export_formulas
-- Oldest first: the listing order, which the target's own order must follow.
SELECT f.id, f.name, f.materials::text, f.fingerprint, f.message_id,
       extract(epoch FROM f.created_at)::double precision,
       f.deliveries,
       extract(epoch FROM f.processed_at)::double precision,
       f.summary::text
  FROM formulary.formulas f
 ORDER BY f.seq;

-- name: export_keys
-- Only keys still alive, in the order they expire; each with its owner (the
-- API key that sent it, '' for none).
SELECT k.key, k.body_digest, k.formula_id, k.duplicate,
       extract(epoch FROM k.expires_at)::double precision,
       k.owner
  FROM formulary.idempotency_keys k
 WHERE k.expires_at > now()
 ORDER BY k.expires_at, k.owner, k.key;

-- name: export_messages
-- Live messages first: redeliveries in the order they become visible (a
-- lease or a delay counts as ending now, as after a broker restart), then
-- fresh messages in publish order; then dead letters, oldest first.
SELECT m.id, m.formula_id, m.fingerprint, m.deliveries, m.state = 'dead'
  FROM formulary.messages m
 ORDER BY m.state = 'dead',
          m.deliveries = 0,
          CASE WHEN m.state <> 'dead' AND m.deliveries > 0 THEN m.visible_at END,
          m.dead_at,
          m.seq;

-- name: export_api_keys
-- Every API key, revoked or not, oldest first: digests of secrets, never secrets.
SELECT a.id, a.name, a.scopes, a.secret_digest,
       extract(epoch FROM a.created_at)::double precision,
       extract(epoch FROM a.revoked_at)::double precision
  FROM formulary.api_keys a
 ORDER BY a.created_at, a.id;

-- name: import_without_timeout
-- A million rows take longer than any broker call is allowed to.
SET LOCAL statement_timeout = 0;

-- name: import_lock_timeout
SET LOCAL lock_timeout = '10s';

-- name: import_lock
-- Nobody writes while the copy checks that the database is empty and fills it.
LOCK TABLE formulary.formulas, formulary.messages, formulary.idempotency_keys,
           formulary.counters, formulary.api_keys IN EXCLUSIVE MODE;

-- name: import_time
SELECT now();

-- name: import_formulas
-- "seq" is generated in the order of the rows: the source's listing order.
COPY formulary.formulas (id, name, materials, fingerprint, message_id, created_at,
                         deliveries, processed_at, summary) FROM STDIN;

-- name: import_keys
COPY formulary.idempotency_keys (owner, key, body_digest, formula_id, duplicate, expires_at)
FROM STDIN;

-- name: import_messages
-- Every live message ready now; "seq" (the default) follows the rows' order.
COPY formulary.messages (id, formula_id, fingerprint, state, visible_at, deliveries, dead_at)
FROM STDIN;

-- name: import_api_keys
COPY formulary.api_keys (id, name, scopes, secret_digest, created_at, revoked_at) FROM STDIN;

-- name: import_dead_letter_times
-- Dead letters are listed by dead_at, then seq: give the copied ones distinct
-- times, one microsecond apart in their source order, just before now() so
-- that any later dead letter comes after them.
UPDATE formulary.messages m
   SET dead_at = now() - make_interval(secs => (d.total - d.position) / 1e6)
  FROM (SELECT m2.id,
               row_number() OVER (ORDER BY m2.seq) AS position,
               count(*) OVER () AS total
          FROM formulary.messages m2
         WHERE m2.state = 'dead') d
 WHERE m.id = d.id;

-- name: import_counters
-- The sums formulary.submit and the gauges read, all in slot 0.
UPDATE formulary.counters c
   SET live = CASE WHEN c.slot = 0
                   THEN (SELECT count(*) FROM formulary.messages m WHERE m.state <> 'dead')
                   ELSE 0 END,
       formulas = CASE WHEN c.slot = 0
                       THEN (SELECT count(*) FROM formulary.formulas)
                       ELSE 0 END;
