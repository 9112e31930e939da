-- The PostgreSQL engine's named queries. Each starts with "-- name: NAME" and
-- runs as one statement; the atomic steps themselves are in functions.sql.
-- Parameters are psycopg's %(name)s placeholders.
--
-- A message's state as people see it is derived from its row and the
-- database's clock, never from when some broker last swept: a lease whose time
-- has passed is ready again (or dead, past the delivery limit) at that instant.

-- name: ping
SELECT 1;

-- name: notify
-- What a publish sends (formulary.submit does the same); waking every listener
-- costs each broker one look at the queue.
SELECT pg_notify('formulary_messages', '');

-- name: submit_many
SELECT ord, outcome, formula_id, name, materials, fingerprint, message_id, created_at
  FROM formulary.submit_many(%(group)s::jsonb, %(key_ttl)s, %(capacity)s)
 ORDER BY ord;

-- name: formulas_by_id
SELECT v.id, v.name, v.materials, v.fingerprint, v.message_id, v.created_at, v.status,
       v.deliveries, v.processed_at, v.summary
  FROM formulary.formula_views(%(max_deliveries)s) v
 WHERE v.id = ANY(%(ids)s);

-- name: formula_page
-- The columns of formulas_by_id, then seq (the next cursor).
SELECT v.id, v.name, v.materials, v.fingerprint, v.message_id, v.created_at, v.status,
       v.deliveries, v.processed_at, v.summary, v.seq
  FROM formulary.formula_views(%(max_deliveries)s) v
 WHERE v.seq < %(before)s
 ORDER BY v.seq DESC
 LIMIT %(limit)s;

-- name: bury_expired
SELECT formulary.bury_expired(%(max_deliveries)s);

-- name: lease
SELECT message_id, formula_id, fingerprint, lease_token, deliveries, lease_expires_at,
       redelivery, visible_since, seq
  FROM formulary.lease(%(consumer)s, %(max)s, %(lease_seconds)s, %(max_deliveries)s);

-- name: seconds_to_next_due
-- When the earliest lease or delay falls due: how long a long poll may sleep.
SELECT extract(epoch FROM min(m.visible_at) - now())::double precision
  FROM formulary.messages m
 WHERE m.state <> 'dead' AND m.deliveries > 0 AND m.visible_at > now();

-- name: complete
SELECT formulary.complete(%(message_id)s, %(token)s, %(summary)s::json);

-- name: complete_many
SELECT ord, outcome
  FROM formulary.complete_many(%(message_ids)s, %(tokens)s, %(summaries)s::json[])
 ORDER BY ord;

-- name: nack
SELECT formulary.nack(%(message_id)s, %(token)s, %(delay)s, %(max_deliveries)s);

-- name: extend
UPDATE formulary.messages m
   SET visible_at = now() + make_interval(secs => %(seconds)s)
 WHERE m.id = %(message_id)s AND m.state = 'leased' AND m.lease_token = %(token)s
   AND m.visible_at > now()
RETURNING extract(epoch FROM m.visible_at)::double precision;

-- name: message_info
SELECT m.id, m.formula_id, m.fingerprint,
       CASE WHEN m.state = 'dead'
              OR (m.deliveries >= %(max_deliveries)s AND m.visible_at <= now()) THEN 'dead'
            WHEN m.visible_at <= now() THEN 'ready'
            WHEN m.state = 'leased' THEN 'in_flight'
            ELSE 'delayed' END AS state,
       m.deliveries,
       CASE WHEN m.state = 'leased' AND m.visible_at > now() THEN m.consumer END,
       CASE WHEN m.state <> 'dead' AND m.visible_at > now()
            THEN extract(epoch FROM m.visible_at)::double precision END
  FROM formulary.messages m
 WHERE m.id = %(message_id)s;

-- name: dead_letters
SELECT m.id, m.formula_id, m.fingerprint, 'dead', m.deliveries, NULL, NULL
  FROM formulary.messages m
 WHERE m.state = 'dead'
 ORDER BY m.dead_at, m.seq
 LIMIT %(limit)s;

-- name: redrive
SELECT formulary.redrive(%(message_id)s);

-- name: gauges
-- One pass over the messages (at most the queue's capacity, plus dead letters)
-- and the counters' few rows.
SELECT (SELECT coalesce(sum(c.formulas), 0) FROM formulary.counters c)::bigint,
       count(*) FILTER (WHERE m.visible_at <= now() AND m.state <> 'dead'
                          AND m.deliveries < %(max_deliveries)s),
       count(*) FILTER (WHERE m.state = 'leased' AND m.visible_at > now()),
       count(*) FILTER (WHERE m.state = 'ready' AND m.visible_at > now()),
       count(*) FILTER (WHERE m.state = 'dead'
                          OR (m.deliveries >= %(max_deliveries)s AND m.visible_at <= now()))
  FROM formulary.messages m;

-- name: forget_expired_keys
-- A batch of keys past their time (lookups ignore them already; this only
-- keeps the table small). Several brokers may sweep at once: each skips what
-- another holds. The batch is deleted by its rows' ctid (locked, so they stay
-- put): matched by key instead, the planner may scan the whole table.
DELETE FROM formulary.idempotency_keys k
 WHERE k.ctid = ANY (ARRAY(SELECT k2.ctid FROM formulary.idempotency_keys k2
                            WHERE k2.expires_at <= now()
                            LIMIT 1000
                              FOR UPDATE SKIP LOCKED));

-- name: api_key
-- One key, read afresh on every call: a revocation on any host counts at once.
SELECT a.id, a.name, a.scopes, a.secret_digest,
       extract(epoch FROM a.created_at)::double precision,
       extract(epoch FROM a.revoked_at)::double precision
  FROM formulary.api_keys a
 WHERE a.id = %(key_id)s;

-- name: api_keys
SELECT a.id, a.name, a.scopes, a.secret_digest,
       extract(epoch FROM a.created_at)::double precision,
       extract(epoch FROM a.revoked_at)::double precision
  FROM formulary.api_keys a
 ORDER BY a.created_at, a.id;

-- name: create_api_key
-- No row back if the id is taken (the broker draws another).
INSERT INTO formulary.api_keys (id, name, scopes, secret_digest)
VALUES (%(key_id)s, %(name)s, %(scopes)s, %(secret_digest)s)
ON CONFLICT (id) DO NOTHING
RETURNING extract(epoch FROM created_at)::double precision;

-- name: revoke_api_key
-- No row back for an unknown key; a key revoked before keeps its first time.
UPDATE formulary.api_keys a
   SET revoked_at = coalesce(a.revoked_at, clock_timestamp())
 WHERE a.id = %(key_id)s
RETURNING a.revoked_at;
