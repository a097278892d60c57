"""The PostgreSQL store's schema: versioned DDL (migrations) and the writer role's grants."""

from __future__ import annotations

import logging
from typing import Final

from coworker.audit.chain_seal import SEAL_PREFIX
from coworker.audit.store_postgres._wire import DEFAULT_SCHEMA

_log = logging.getLogger("coworker.audit")


SCHEMA_VERSION: Final = 8
"""Version of the table layout, kept in ``<schema>.schema_version``."""

# First key of the two-int advisory locks we take ('cowr'); the second is a table's oid.
_LOCK_NAMESPACE: Final = 0x636F7772
# Second key of the lock that serializes schema creation (before any table oid exists).
_DDL_LOCK: Final = 1


# See PostgresStore._flush. The message is empty; logical decoding consumers (if any) see it
# under this prefix and can ignore it.
# Everything qualified: it runs with the writer session's search_path, which the database's
# owner can set (ALTER DATABASE ... SET search_path = evil, pg_catalog) to put a no-op
# pg_logical_emit_message ahead of pg_catalog's: every append would be answered durable
# before its commit is on disk.
_FLUSH: Final = (
    "SELECT CASE WHEN pg_catalog.current_setting('synchronous_commit')"
    " OPERATOR(pg_catalog.=) 'off'"
    " THEN pg_catalog.set_config('synchronous_commit', 'on', true) END,"
    " pg_catalog.pg_logical_emit_message(true, 'coworker-audit-flush', ''::pg_catalog.bytea)"
)

_DDL_V1: Final = """
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {schema}.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'coworker audit log is append-only: % on %.% refused',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write a correction record instead';
END
$$;
CREATE TABLE {schema}.records (
    seq bigint PRIMARY KEY CHECK (seq >= 1),
    prev_hash bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    body bytea NOT NULL,
    dedup_key bytea,
    inserted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind text, category text, operation text, doctype text, outcome text,
    flow_id text, step_id text, run_id text, user_id text, agent_id text,
    trace_id text, span_id text,
    -- RFC 3339 fixed width: byte order is time order (COLLATE "C", whatever the database's).
    recorded_at text COLLATE "C", time text COLLATE "C",
    CONSTRAINT records_prev_hash_key UNIQUE (prev_hash)
);
CREATE TABLE {schema}.payloads (seq bigint PRIMARY KEY, payload bytea);
CREATE FUNCTION {schema}.lock_head(lock_key integer) RETURNS TABLE (seq bigint, hash bytea)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Commit without waiting for the WAL flush (the store waits for it after the lock is
    -- released, see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock({namespace}, lock_key);
    -- A VOLATILE function takes a new snapshot for each statement (READ COMMITTED): this
    -- reads the head as of after the lock was granted.
    RETURN QUERY SELECT r.seq, r.hash FROM {schema}.records r ORDER BY r.seq DESC LIMIT 1;
END
$$;
CREATE UNIQUE INDEX records_dedup_key ON {schema}.records (dedup_key)
    WHERE dedup_key IS NOT NULL;
CREATE INDEX records_flow ON {schema}.records (flow_id, seq);
CREATE INDEX records_user ON {schema}.records (user_id, seq);
CREATE INDEX records_time ON {schema}.records (time);
CREATE TRIGGER records_no_change BEFORE UPDATE OR DELETE ON {schema}.records
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER records_no_change_stmt BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.records
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER schema_version_no_change BEFORE UPDATE OR DELETE ON {schema}.schema_version
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change();
CREATE TRIGGER schema_version_no_change_stmt
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.schema_version
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change();
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_no_change;
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_no_change_stmt;
ALTER TABLE {schema}.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change;
ALTER TABLE {schema}.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;
"""

# Version 2: the database itself refuses an insert that does not chain onto the log (a seq
# that is not the next one, a prev_hash that is not its predecessor's hash, a hash that is not
# SHA-256(prev_hash || body)), whoever sends it: a writer role that INSERTs by hand, skipping
# the lock or forging a hash, is refused like a fork. One check per statement (a transition
# table), not per row.
_DDL_V2: Final = """
CREATE FUNCTION {schema}.check_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT n.seq INTO bad FROM new_rows n
        LEFT JOIN {schema}.records p ON p.seq = n.seq - 1
        WHERE n.hash IS DISTINCT FROM sha256(n.prev_hash || n.body)
           OR (n.seq = 1 AND n.prev_hash IS DISTINCT FROM decode(repeat('00', 32), 'hex'))
           OR (n.seq > 1 AND p.hash IS DISTINCT FROM n.prev_hash)
        ORDER BY n.seq LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'coworker audit log: record % does not chain onto the log', bad
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'seq must follow the head, prev_hash be its hash, hash be '
                         'sha256(prev_hash || body): append through coworker';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER records_chain AFTER INSERT ON {schema}.records
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.check_chain();
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_chain;
"""

# Version 3 (issue 15): per-subject data keys of encrypted payloads. Deliberately without
# the append-only guards: erasing a subject deletes its row (coworker.audit.erasure).
_DDL_V3: Final = """
CREATE TABLE {schema}.keys (
    subject text PRIMARY KEY,
    key bytea NOT NULL CHECK (octet_length(key) = 32),
    created timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

# Version 4 (issue 17): the append in one round trip, sealed by the database. The client
# canonicalises each entry with a hole where its seq goes (coworker.audit.chain.Prepared) and
# sends the bytes before and after the hole; append() takes the lock, reads the head, splices
# in each seq as decimal digits (exactly what Prepared.body does), hashes with PostgreSQL's own
# sha256() (exactly chain.link: SHA-256(prev_hash || body)), inserts and returns. The lock is
# held only while the server works: no client round trip happens under it. ``attempt`` is a
# random nonce per append call, unhashed and unindexed: after a connection died with the
# answer in flight, the next attempt finds the rows that did commit (docs/postgres.md).
# The ALTER TABLE comes first: the guard restore re-runs only what follows the last function.
_DDL_V4: Final = """
ALTER TABLE {schema}.records ADD COLUMN attempt bytea;
CREATE OR REPLACE FUNCTION {schema}.check_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    -- The same refusals as version 2, at half the cost (it runs under the append lock): a
    -- row must follow the one before it in the statement (lag over seq), the first row the
    -- record already in the log (one index probe), and every hash must be its own.
    SELECT n.seq INTO bad FROM (
        SELECT r.seq, r.prev_hash, r.hash, r.body,
               lag(r.seq) OVER w AS lseq, lag(r.hash) OVER w AS lhash
        FROM new_rows r WINDOW w AS (ORDER BY r.seq)
    ) n
    WHERE n.hash IS DISTINCT FROM sha256(n.prev_hash || n.body)
       OR (n.lseq IS NOT NULL
           AND (n.lseq <> n.seq - 1 OR n.lhash IS DISTINCT FROM n.prev_hash))
       OR (n.lseq IS NULL AND n.seq = 1
           AND n.prev_hash IS DISTINCT FROM decode(repeat('00', 32), 'hex'))
       OR (n.lseq IS NULL AND n.seq > 1
           AND (SELECT p.hash FROM {schema}.records p WHERE p.seq = n.seq - 1)
               IS DISTINCT FROM n.prev_hash)
    ORDER BY n.seq LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'coworker audit log: record % does not chain onto the log', bad
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'seq must follow the head, prev_hash be its hash, hash be '
                         'sha256(prev_hash || body): append through coworker';
    END IF;
    RETURN NULL;
END
$$;
CREATE FUNCTION {schema}.append(
    lock_key integer, attempt bytea, before bytea[], after bytea[], payload bytea[],
    dedup bytea[], kind text[], category text[], operation text[], doctype text[],
    outcome text[], flow_id text[], step_id text[], run_id text[], user_id text[],
    agent_id text[], trace_id text[], span_id text[], recorded_at text[], "time" text[]
) RETURNS TABLE (i integer, seq bigint, prev_hash bytea, hash bytea)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer := coalesce(cardinality(before), 0);
    head bigint;
    prev bytea;
    body bytea;
    keep boolean[] := array_fill(true, ARRAY[n]);
    seen bytea[] := '{}';
    idx integer[] := '{}';
    seqs bigint[] := '{}';
    prevs bytea[] := '{}';
    hashes bytea[] := '{}';
    bodies bytea[] := '{}';
    inserted bigint;
BEGIN
    -- Under REPEATABLE READ the snapshot predates the lock and the head read below would be
    -- stale: the chain would fork (the unique prev_hash refuses it, but refuse it here first).
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'coworker audit append needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- Commit without waiting for the WAL flush: the lock is free at once; the store waits
    -- for the flush after it (see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock({namespace}, lock_key);
    -- A new statement, a new snapshot (READ COMMITTED): the head as of after the lock.
    SELECT r.seq, r.hash INTO head, prev FROM {schema}.records r ORDER BY r.seq DESC LIMIT 1;
    IF head IS NULL THEN
        head := 0;
        prev := decode(repeat('00', 32), 'hex');
    END IF;
    IF dedup IS NOT NULL THEN
        FOR k IN 1..n LOOP
            CONTINUE WHEN dedup[k] IS NULL;
            IF dedup[k] = ANY(seen) OR EXISTS (
                SELECT 1 FROM {schema}.records d WHERE d.dedup_key = dedup[k]
            ) THEN
                keep[k] := false;
            ELSE
                seen := seen || dedup[k];
            END IF;
        END LOOP;
    END IF;
    FOR k IN 1..n LOOP
        CONTINUE WHEN NOT keep[k];
        head := head + 1;
        body := before[k] || convert_to(head::text, 'UTF8') || after[k];
        idx := idx || k;
        seqs := seqs || head;
        prevs := prevs || prev;
        prev := sha256(prev || body);
        hashes := hashes || prev;
        bodies := bodies || body;
    END LOOP;
    INSERT INTO {schema}.records (seq, prev_hash, hash, body, dedup_key, kind, category,
        operation, doctype, outcome, flow_id, step_id, run_id, user_id, agent_id, trace_id,
        span_id, recorded_at, "time", attempt)
    SELECT s.q, s.p, s.h, s.b, dedup[s.k], kind[s.k], category[s.k], operation[s.k],
        doctype[s.k], outcome[s.k], flow_id[s.k], step_id[s.k], run_id[s.k], user_id[s.k],
        agent_id[s.k], trace_id[s.k], span_id[s.k], recorded_at[s.k], "time"[s.k], attempt
    FROM unnest(idx, seqs, prevs, hashes, bodies) AS s(k, q, p, h, b);
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted <> cardinality(seqs) THEN
        -- A rule (DO INSTEAD NOTHING) or a trigger returning NULL dropped rows silently.
        RAISE EXCEPTION 'coworker audit append: only % of % row(s) were inserted: a rule or '
            'trigger on the table dropped them (run coworker audit verify)',
            inserted, cardinality(seqs)
            USING ERRCODE = 'triggered_action_exception';
    END IF;
    IF payload IS NOT NULL THEN
        INSERT INTO {schema}.payloads (seq, payload)
        SELECT s.q, payload[s.k] FROM unnest(idx, seqs) AS s(k, q)
        WHERE payload[s.k] IS NOT NULL;
    END IF;
    RETURN QUERY
        SELECT s.k, s.q, s.p, s.h FROM unnest(idx, seqs, prevs, hashes) AS s(k, q, p, h)
        UNION ALL
        SELECT k, NULL::bigint, NULL::bytea, NULL::bytea
        FROM generate_subscripts(keep, 1) AS k WHERE NOT keep[k];
END
$$;
"""

# Version 5 (issue 17): the same append() and chain check, doing less under the lock (the
# lock serializes every writer, so its work runs on one core while the others wait):
# * append() runs with its owner's rights (SECURITY DEFINER, a fixed search_path) and the
#   chain check skips the rows its owner inserts (records_chain WHEN NOT owner_writes()):
#   append() computes seq, prev_hash and hash itself under the lock, so re-checking its rows
#   only doubled the hashing and cost a PL/pgSQL trigger call per append. A writer role's
#   own INSERTs are checked as before; the owner could drop the trigger anyway.
# * append(): per entry one PL/pgSQL statement under the lock (the hash); the rows go in
#   with one INSERT reading the parameter arrays themselves (no arrays rebuilt row by row), the
#   dedup keys are looked up with one query, set_config and the lock are plain expressions
#   (no executor start), and its statements use generic plans (plan_cache_mode: a custom plan
#   per call for array parameters otherwise, planned again every time);
# * check_chain(): reads the statement's rows in their insertion order instead of sorting
#   them: a row must follow the one inserted before it (seq + 1, its hash as prev_hash), the
#   first one a record already in the log. That refuses everything version 4 refused, and
#   also a statement whose rows are out of order (coworker inserts in seq order).
_DDL_V5: Final = """
CREATE OR REPLACE FUNCTION {schema}.check_chain() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad bigint;
BEGIN
    -- In insertion order (no sort): whatever order the rows are read in, they pass only if
    -- each follows the one read before it, so the first one read must follow the log.
    SELECT n.seq INTO bad FROM (
        SELECT r.seq, r.prev_hash, r.hash, r.body,
               lag(r.seq) OVER () AS lseq, lag(r.hash) OVER () AS lhash
        FROM new_rows r
    ) n
    WHERE n.hash IS DISTINCT FROM sha256(n.prev_hash || n.body)
       OR (n.lseq IS NOT NULL
           AND (n.lseq <> n.seq - 1 OR n.lhash IS DISTINCT FROM n.prev_hash))
       OR (n.lseq IS NULL AND n.seq = 1
           AND n.prev_hash IS DISTINCT FROM decode(repeat('00', 32), 'hex'))
       OR (n.lseq IS NULL AND n.seq > 1
           AND (SELECT p.hash FROM {schema}.records p WHERE p.seq = n.seq - 1)
               IS DISTINCT FROM n.prev_hash)
    ORDER BY n.seq LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'coworker audit log: record % does not chain onto the log', bad
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'seq must follow the head, prev_hash be its hash, hash be '
                         'sha256(prev_hash || body), rows in seq order: append through coworker';
    END IF;
    RETURN NULL;
END
$$;
CREATE OR REPLACE FUNCTION {schema}.append(
    lock_key integer, attempt bytea, before bytea[], after bytea[], payload bytea[],
    dedup bytea[], kind text[], category text[], operation text[], doctype text[],
    outcome text[], flow_id text[], step_id text[], run_id text[], user_id text[],
    agent_id text[], trace_id text[], span_id text[], recorded_at text[], "time" text[]
) RETURNS TABLE (i integer, seq bigint, prev_hash bytea, hash bytea)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n integer := coalesce(cardinality(before), 0);
    m integer;
    head bigint;
    top bytea;
    -- NULL: every entry is kept, the k-th gets seq head + k; else pos[k] is the place of
    -- entry k among the kept ones (NULL: its dedup key is already in the log or the batch).
    pos integer[];
    hashes bytea[] := '{}';
    inserted bigint;
    done text;
BEGIN
    -- Under REPEATABLE READ the snapshot predates the lock and the head read below would be
    -- stale: the chain would fork (the unique prev_hash refuses it, but refuse it here first).
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'coworker audit append needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- append() inserts with its owner's rights: only a session whose role may INSERT the
    -- rows itself may call it (an auditor with SELECT only may not append through it).
    IF NOT has_table_privilege(session_user, {records_regclass}, 'INSERT')
       OR (payload IS NOT NULL AND NOT has_table_privilege(session_user,
           {payloads_regclass}, 'INSERT')) THEN
        RAISE EXCEPTION 'permission denied: % may not insert into the audit log', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Commit without waiting for the WAL flush: the lock is free at once; the store waits
    -- for the flush after it (see PostgresStore._flush). Assignments, not PERFORM: a plain
    -- expression costs no executor start.
    done := set_config('synchronous_commit', 'off', true);
    done := pg_advisory_xact_lock({namespace}, lock_key)::text;
    -- A new statement, a new snapshot (READ COMMITTED): the head as of after the lock.
    SELECT r.seq, r.hash INTO head, top FROM {schema}.records r ORDER BY r.seq DESC LIMIT 1;
    IF head IS NULL THEN
        head := 0;
        top := decode(repeat('00', 32), 'hex');
    END IF;
    m := n;
    IF dedup IS NOT NULL THEN
        -- Kept: no key, or the first entry of the batch with its key and the key not yet in
        -- the log. pos numbers the kept entries 1, 2, ... in order.
        SELECT array_agg(CASE WHEN u.keep THEN u.rank END ORDER BY u.k),
               coalesce(sum(u.keep::integer), 0)
            INTO pos, m
        FROM (
            SELECT d.k, d.keep, count(*) FILTER (WHERE d.keep) OVER (ORDER BY d.k) AS rank
            FROM (
                SELECT x.k, x.key IS NULL OR (
                    x.k = min(x.k) OVER (PARTITION BY x.key)
                    AND NOT EXISTS (
                        SELECT 1 FROM {schema}.records r WHERE r.dedup_key = x.key
                    )
                ) AS keep
                FROM unnest(dedup) WITH ORDINALITY AS x(key, k)
            ) d
        ) u;
    END IF;
    -- The only per-entry work under the lock in PL/pgSQL: the chain itself.
    IF pos IS NULL THEN
        FOR k IN 1..n LOOP
            hashes[k] := sha256(coalesce(hashes[k - 1], top) || before[k]
                || convert_to((head + k)::text, 'UTF8') || after[k]);
        END LOOP;
    ELSE
        FOR k IN 1..n LOOP
            CONTINUE WHEN pos[k] IS NULL;
            hashes[pos[k]] := sha256(coalesce(hashes[pos[k] - 1], top) || before[k]
                || convert_to((head + pos[k])::text, 'UTF8') || after[k]);
        END LOOP;
    END IF;
    -- Array parameters are expanded on entry: a subscript is one lookup (cheaper than
    -- unnesting 17 arrays into a tuplestore).
    INSERT INTO {schema}.records (seq, prev_hash, hash, body, dedup_key, kind, category,
        operation, doctype, outcome, flow_id, step_id, run_id, user_id, agent_id, trace_id,
        span_id, recorded_at, "time", attempt)
    SELECT head + s.j, coalesce(hashes[s.j - 1], top), hashes[s.j],
        before[s.k] || convert_to((head + s.j)::text, 'UTF8') || after[s.k], dedup[s.k],
        kind[s.k], category[s.k], operation[s.k], doctype[s.k], outcome[s.k], flow_id[s.k],
        step_id[s.k], run_id[s.k], user_id[s.k], agent_id[s.k], trace_id[s.k], span_id[s.k],
        recorded_at[s.k], "time"[s.k], attempt
    FROM (
        SELECT x.k, CASE WHEN pos IS NULL THEN x.k ELSE pos[x.k] END AS j
        FROM generate_series(1, n) AS x(k)
    ) s
    WHERE s.j IS NOT NULL;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted <> m THEN
        -- A rule (DO INSTEAD NOTHING) or a trigger returning NULL dropped rows silently.
        RAISE EXCEPTION 'coworker audit append: only % of % row(s) were inserted: a rule or '
            'trigger on the table dropped them (run coworker audit verify)',
            inserted, m
            USING ERRCODE = 'triggered_action_exception';
    END IF;
    IF payload IS NOT NULL THEN
        INSERT INTO {schema}.payloads (seq, payload)
        SELECT head + s.j, payload[s.k] FROM (
            SELECT x.k, CASE WHEN pos IS NULL THEN x.k ELSE pos[x.k] END AS j
            FROM generate_series(1, n) AS x(k)
        ) s
        WHERE s.j IS NOT NULL AND payload[s.k] IS NOT NULL;
    END IF;
    RETURN QUERY
        SELECT g.k, head + g.j, CASE WHEN g.j IS NOT NULL THEN
                coalesce(hashes[g.j - 1], top) END, hashes[g.j]
        FROM (
            SELECT x.k, CASE WHEN pos IS NULL THEN x.k ELSE pos[x.k] END AS j
            FROM generate_series(1, n) AS x(k)
        ) g;
END
$$;
CREATE OR REPLACE FUNCTION {schema}.owner_writes() RETURNS boolean
LANGUAGE sql STABLE AS $$
    -- Whether the rows are inserted with the rights of the owner of records (inside append()).
    -- Everything schema-qualified: it runs with the inserting session's search_path, and an
    -- operator or function of a writer's own schema must not answer for it. The name is
    -- compared exactly (a role named "OWNER" is not the role owner).
    SELECT pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) current_user
    FROM pg_catalog.pg_class c
    WHERE c.oid OPERATOR(pg_catalog.=) {records_regclass}::pg_catalog.regclass
$$;
DROP TRIGGER IF EXISTS records_chain ON {schema}.records;
CREATE TRIGGER records_chain AFTER INSERT ON {schema}.records
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (NOT {schema}.owner_writes())
    EXECUTE FUNCTION {schema}.check_chain();
ALTER TABLE {schema}.records ENABLE ALWAYS TRIGGER records_chain;
"""

# Version 6: lock_head() and append() refuse a lock key that is not their chain's. The key is
# the oid of the chain's records table, which the client caches per connection; a client
# with another key (a stale cache after the table was re-created, a hand-written call with
# another chain's key) took a lock no correct writer takes: it read the head and inserted
# beside them, and *their* appends failed as forks (or it blocked another chain's writers).
# Now it fails alone, before taking any lock, with SQLSTATE CWLCK; the store then reconnects,
# re-reads the oid and retries (writes._write_with_retry).
LOCK_KEY_MISMATCH: Final = "CWLCK"
"""SQLSTATE of a lock_head()/append() call whose lock key is not its chain's (schema 6+)."""

_LOCK_KEY_CHECK: Final = """\
    IF lock_key IS DISTINCT FROM {records_regclass}::regclass::oid::integer THEN
        RAISE EXCEPTION 'coworker audit: lock key % is not the lock of this chain (%)',
            lock_key, {records_regclass}::regclass::oid::integer
            USING ERRCODE = 'CWLCK',
                  HINT = 'the oid of the records table changed (re-created?): reconnect';
    END IF;
"""


def _with_lock_key_check(ddl: str, function: str) -> str:
    """``function``'s CREATE statement from ``ddl``, as CREATE OR REPLACE, checking its key
    before it takes the lock."""
    import re

    found = re.search(
        r"CREATE (?:OR REPLACE )?FUNCTION \{schema\}\." + function + r"\(.*?\$\$.*?\$\$;",
        ddl,
        re.DOTALL,
    )
    assert found is not None, function
    text = found.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    lock = re.search(r"^    \S.*pg_advisory_xact_lock\(\{namespace\}, lock_key\).*$", text, re.M)
    assert lock is not None, function
    return text[: lock.start()] + _LOCK_KEY_CHECK + text[lock.start() :]


_DDL_V6: Final = "\n".join(
    [_with_lock_key_check(_DDL_V1, "lock_head"), _with_lock_key_check(_DDL_V5, "append")]
)

# Version 7: append() and lock_head() refuse to append after a seal (a retired chain,
# coworker.audit.chain_seal), with SQLSTATE CWSEA. append() reads the head's category in the
# head read it already does; only a head whose category is the seal's has its body looked at.
CHAIN_SEALED: Final = "CWSEA"
"""SQLSTATE of an append()/lock_head() call on a sealed (retired) chain (schema 7+)."""

# The head is this chain's seal exactly when chain_seal.is_seal says so: the seal's first
# bytes (SEAL_PREFIX), then kind, operation, the chain's name and genesis. A body jsonb cannot
# read (not UTF-8, not JSON, a \u0000 in a string: a writer's, or any record an ingest client
# files under the category chain-seal) is no seal, and must not fail every later append: the
# EXCEPTION block (a subtransaction) is entered only for a head of the seal's category.
_SEAL_CHECK: Final = """\
    IF cat = 'chain-seal' THEN
        BEGIN
            SELECT pg_catalog.substr(s.body, 1, {prefix_len}) OPERATOR(pg_catalog.=)
                   pg_catalog.decode('{prefix_hex}', 'hex')
               AND pg_catalog.convert_from(s.body, 'UTF8')::pg_catalog.jsonb
                   OPERATOR(pg_catalog.@>) pg_catalog.jsonb_build_object(
                       'kind', 'chain', 'operation', 'seal', 'chain_name', {chain_literal},
                       'chain_genesis', {genesis_hex})
                INTO sealed FROM {schema}.records s WHERE s.seq = head;
        EXCEPTION WHEN OTHERS THEN
            sealed := false;
        END;
        IF sealed THEN
            RAISE EXCEPTION 'coworker audit: chain % was retired (sealed at seq %): append '
                'refused', {chain_literal}, head
                USING ERRCODE = 'CWSEA',
                      HINT = 'a retired chain is never written again: write to another chain';
        END IF;
    END IF;
""".replace("{prefix_len}", str(len(SEAL_PREFIX))).replace("{prefix_hex}", SEAL_PREFIX.hex())


def _with_seal_check(ddl: str, function: str) -> str:
    """``function``'s CREATE OR REPLACE statement from ``ddl``, refusing a sealed head."""
    import re

    found = re.search(
        r"CREATE OR REPLACE FUNCTION \{schema\}\." + function + r"\(.*?\$\$.*?\$\$;",
        ddl,
        re.DOTALL,
    )
    assert found is not None, function
    text = found.group(0)
    if function == "append":
        read = (
            "    SELECT r.seq, r.hash INTO head, top FROM {schema}.records r"
            " ORDER BY r.seq DESC LIMIT 1;\n"
        )
        assert read in text and "    done text;\n" in text
        text = text.replace(
            "    done text;\n", "    done text;\n    cat text;\n    sealed boolean;\n", 1
        )
        text = text.replace(
            read,
            "    SELECT r.seq, r.hash, r.category INTO head, top, cat FROM {schema}.records r"
            " ORDER BY r.seq DESC LIMIT 1;\n" + _SEAL_CHECK,
            1,
        )
        return text
    # lock_head(): RETURNS TABLE (seq, hash); its head read is the RETURN QUERY.
    ret = (
        "    RETURN QUERY SELECT r.seq, r.hash FROM {schema}.records r"
        " ORDER BY r.seq DESC LIMIT 1;\n"
    )
    assert ret in text
    text = text.replace(
        "LANGUAGE plpgsql VOLATILE AS $$\nBEGIN\n",
        (
            "LANGUAGE plpgsql VOLATILE AS $$\nDECLARE\n    head bigint;\n    cat text;\n"
            "    sealed boolean;\nBEGIN\n"
        ),
        1,
    )
    return text.replace(
        ret,
        "    SELECT r.seq, r.category INTO head, cat FROM {schema}.records r"
        " ORDER BY r.seq DESC LIMIT 1;\n" + _SEAL_CHECK + ret,
        1,
    )


def _check_chain_v7() -> str:
    """Version 5's check_chain(), also refusing a writer role's raw INSERT after a seal
    (append() refuses its own; the owner's inserts skip the check, as since version 5)."""
    import re

    found = re.search(
        r"CREATE OR REPLACE FUNCTION \{schema\}\.check_chain\(.*?\$\$.*?\$\$;", _DDL_V5, re.DOTALL
    )
    assert found is not None
    text = found.group(0)
    lag = "               lag(r.seq) OVER () AS lseq, lag(r.hash) OVER () AS lhash\n"
    last = (
        "       OR (n.lseq IS NULL AND n.seq > 1\n"
        "           AND (SELECT p.hash FROM {schema}.records p WHERE p.seq = n.seq - 1)\n"
        "               IS DISTINCT FROM n.prev_hash)\n"
    )
    assert lag in text and last in text
    text = text.replace(
        lag,
        "               lag(r.seq) OVER () AS lseq, lag(r.hash) OVER () AS lhash,\n"
        "               lag(r.category) OVER () AS lcat\n",
        1,
    )
    return text.replace(
        last,
        last + "       OR n.lcat = 'chain-seal'\n"
        "       OR (n.lseq IS NULL AND n.seq > 1 AND (SELECT p.category FROM {schema}.records p\n"
        "           WHERE p.seq = n.seq - 1) = 'chain-seal')\n",
        1,
    )


_DDL_V7: Final = "\n".join(
    [
        _with_seal_check(_DDL_V6, "lock_head"),
        _with_seal_check(_DDL_V6, "append"),
        _check_chain_v7(),
    ]
)

# Version 8 (issue 17): owner_writes() in PL/pgSQL, same answer. The chain trigger's WHEN
# calls it once per INSERT statement, so once per append(); a SQL function whose body has a
# FROM is never inlined, and its body is parsed and planned again at every call (its cache
# lives as long as the calling statement): ~70 us of a 1-record append's ~400 us on the
# server here. PL/pgSQL keeps the plan for the session. No SET clause (a GUC save/restore at
# every call): its one query is schema-qualified throughout, as the SQL body was.
_DDL_V8: Final = """
CREATE OR REPLACE FUNCTION {schema}.owner_writes() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- Whether the rows are inserted with the rights of the owner of records (inside append()).
    -- Everything schema-qualified: it runs with the inserting session's search_path, and an
    -- operator or function of a writer's own schema must not answer for it. The name is
    -- compared exactly (a role named "OWNER" is not the role owner).
    RETURN (
        SELECT pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) current_user
        FROM pg_catalog.pg_class c
        WHERE c.oid OPERATOR(pg_catalog.=) {records_regclass}::pg_catalog.regclass
    );
END
$$;
"""

_MIGRATIONS: Final = {
    1: _DDL_V1, 2: _DDL_V2, 3: _DDL_V3, 4: _DDL_V4, 5: _DDL_V5, 6: _DDL_V6, 7: _DDL_V7,
    8: _DDL_V8,
}  # fmt: skip


def writer_grants(role: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """The SQL statements that give ``role`` exactly what an audit writer needs.

    INSERT and SELECT on the log tables and nothing else: no UPDATE, DELETE, TRUNCATE, no DDL
    (the schema and tables belong to a separate owner role). Run them as the owner after the
    schema exists (after the top :class:`PostgresStore` opened it as the owner).

    Args:
        role: the writer role (must exist).
        schema: the audit schema.

    Returns:
        SQL statements with quoted identifiers, in order.
    """
    s = _quote_ident(schema)
    r = _quote_ident(role)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        f"GRANT SELECT, INSERT ON {s}.records, {s}.payloads TO {r}",
        f"GRANT SELECT ON {s}.schema_version TO {r}",
        # Data keys of encrypted payloads: made by writers, destroyed only by the owner
        # (coworker audit erase).
        f"GRANT SELECT, INSERT ON {s}.keys TO {r}",
    ]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# How our DDL writes the default chain's genesis (32 zero bytes); a named chain's schema gets
# its own value in its place (coworker.audit.chain.genesis), in check_chain() and append().
_ZERO_GENESIS: Final = "decode(repeat('00', 32), 'hex')"


def render(text: str, schema: str, chain: str = "") -> str:
    """Our DDL (or a function source from it) for ``schema``, holding ``chain``."""
    from coworker.audit.chain import genesis

    records = _quote_ident(schema) + ".records"
    payloads = _quote_ident(schema) + ".payloads"
    out = (
        text.replace("{schema}", _quote_ident(schema))
        .replace("{namespace}", str(_LOCK_NAMESPACE))
        .replace("{records_regclass}", "'" + records.replace("'", "''") + "'")
        .replace("{payloads_regclass}", "'" + payloads.replace("'", "''") + "'")
        .replace("{chain_literal}", "'" + chain.replace("'", "''") + "'::pg_catalog.text")
        .replace("{genesis_hex}", f"'{genesis(chain).hex()}'::pg_catalog.text")
    )
    if chain:
        out = out.replace(_ZERO_GENESIS, f"decode('{genesis(chain).hex()}', 'hex')")
    return out
