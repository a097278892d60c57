-- A schema-version-7 audit store (3 records: payloads, dedup keys) made by coworker at commit a2afd6e
-- (before schema version 8), dumped with pg_dump --inserts; tests load it under another schema name.
--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: cw_v7_fixture; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA cw_v7_fixture;


--
-- Name: append(integer, bytea, bytea[], bytea[], bytea[], bytea[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[]); Type: FUNCTION; Schema: cw_v7_fixture; Owner: -
--

CREATE FUNCTION cw_v7_fixture.append(lock_key integer, attempt bytea, before bytea[], after bytea[], payload bytea[], dedup bytea[], kind text[], category text[], operation text[], doctype text[], outcome text[], flow_id text[], step_id text[], run_id text[], user_id text[], agent_id text[], trace_id text[], span_id text[], recorded_at text[], "time" text[]) RETURNS TABLE(i integer, seq bigint, prev_hash bytea, hash bytea)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
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
    cat text;
    sealed boolean;
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
    IF NOT has_table_privilege(session_user, '"cw_v7_fixture".records', 'INSERT')
       OR (payload IS NOT NULL AND NOT has_table_privilege(session_user,
           '"cw_v7_fixture".payloads', 'INSERT')) THEN
        RAISE EXCEPTION 'permission denied: % may not insert into the audit log', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Commit without waiting for the WAL flush: the lock is free at once; the store waits
    -- for the flush after it (see PostgresStore._flush). Assignments, not PERFORM: a plain
    -- expression costs no executor start.
    done := set_config('synchronous_commit', 'off', true);
    IF lock_key IS DISTINCT FROM '"cw_v7_fixture".records'::regclass::oid::integer THEN
        RAISE EXCEPTION 'coworker audit: lock key % is not the lock of this chain (%)',
            lock_key, '"cw_v7_fixture".records'::regclass::oid::integer
            USING ERRCODE = 'CWLCK',
                  HINT = 'the oid of the records table changed (re-created?): reconnect';
    END IF;
    done := pg_advisory_xact_lock(1668249458, lock_key)::text;
    -- A new statement, a new snapshot (READ COMMITTED): the head as of after the lock.
    SELECT r.seq, r.hash, r.category INTO head, top, cat FROM "cw_v7_fixture".records r ORDER BY r.seq DESC LIMIT 1;
    IF cat = 'chain-seal' THEN
        BEGIN
            SELECT pg_catalog.substr(s.body, 1, 25) OPERATOR(pg_catalog.=)
                   pg_catalog.decode('7b2263617465676f7279223a22636861696e2d7365616c222c', 'hex')
               AND pg_catalog.convert_from(s.body, 'UTF8')::pg_catalog.jsonb
                   OPERATOR(pg_catalog.@>) pg_catalog.jsonb_build_object(
                       'kind', 'chain', 'operation', 'seal', 'chain_name', ''::pg_catalog.text,
                       'chain_genesis', '0000000000000000000000000000000000000000000000000000000000000000'::pg_catalog.text)
                INTO sealed FROM "cw_v7_fixture".records s WHERE s.seq = head;
        EXCEPTION WHEN OTHERS THEN
            sealed := false;
        END;
        IF sealed THEN
            RAISE EXCEPTION 'coworker audit: chain % was retired (sealed at seq %): append '
                'refused', ''::pg_catalog.text, head
                USING ERRCODE = 'CWSEA',
                      HINT = 'a retired chain is never written again: write to another chain';
        END IF;
    END IF;
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
                        SELECT 1 FROM "cw_v7_fixture".records r WHERE r.dedup_key = x.key
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
    INSERT INTO "cw_v7_fixture".records (seq, prev_hash, hash, body, dedup_key, kind, category,
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
        INSERT INTO "cw_v7_fixture".payloads (seq, payload)
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


--
-- Name: check_chain(); Type: FUNCTION; Schema: cw_v7_fixture; Owner: -
--

CREATE FUNCTION cw_v7_fixture.check_chain() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    bad bigint;
BEGIN
    -- In insertion order (no sort): whatever order the rows are read in, they pass only if
    -- each follows the one read before it, so the first one read must follow the log.
    SELECT n.seq INTO bad FROM (
        SELECT r.seq, r.prev_hash, r.hash, r.body,
               lag(r.seq) OVER () AS lseq, lag(r.hash) OVER () AS lhash,
               lag(r.category) OVER () AS lcat
        FROM new_rows r
    ) n
    WHERE n.hash IS DISTINCT FROM sha256(n.prev_hash || n.body)
       OR (n.lseq IS NOT NULL
           AND (n.lseq <> n.seq - 1 OR n.lhash IS DISTINCT FROM n.prev_hash))
       OR (n.lseq IS NULL AND n.seq = 1
           AND n.prev_hash IS DISTINCT FROM decode(repeat('00', 32), 'hex'))
       OR (n.lseq IS NULL AND n.seq > 1
           AND (SELECT p.hash FROM "cw_v7_fixture".records p WHERE p.seq = n.seq - 1)
               IS DISTINCT FROM n.prev_hash)
       OR n.lcat = 'chain-seal'
       OR (n.lseq IS NULL AND n.seq > 1 AND (SELECT p.category FROM "cw_v7_fixture".records p
           WHERE p.seq = n.seq - 1) = 'chain-seal')
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


--
-- Name: lock_head(integer); Type: FUNCTION; Schema: cw_v7_fixture; Owner: -
--

CREATE FUNCTION cw_v7_fixture.lock_head(lock_key integer) RETURNS TABLE(seq bigint, hash bytea)
    LANGUAGE plpgsql
    AS $$
DECLARE
    head bigint;
    cat text;
    sealed boolean;
BEGIN
    -- Commit without waiting for the WAL flush (the store waits for it after the lock is
    -- released, see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    IF lock_key IS DISTINCT FROM '"cw_v7_fixture".records'::regclass::oid::integer THEN
        RAISE EXCEPTION 'coworker audit: lock key % is not the lock of this chain (%)',
            lock_key, '"cw_v7_fixture".records'::regclass::oid::integer
            USING ERRCODE = 'CWLCK',
                  HINT = 'the oid of the records table changed (re-created?): reconnect';
    END IF;
    PERFORM pg_advisory_xact_lock(1668249458, lock_key);
    -- A VOLATILE function takes a new snapshot for each statement (READ COMMITTED): this
    -- reads the head as of after the lock was granted.
    SELECT r.seq, r.category INTO head, cat FROM "cw_v7_fixture".records r ORDER BY r.seq DESC LIMIT 1;
    IF cat = 'chain-seal' THEN
        BEGIN
            SELECT pg_catalog.substr(s.body, 1, 25) OPERATOR(pg_catalog.=)
                   pg_catalog.decode('7b2263617465676f7279223a22636861696e2d7365616c222c', 'hex')
               AND pg_catalog.convert_from(s.body, 'UTF8')::pg_catalog.jsonb
                   OPERATOR(pg_catalog.@>) pg_catalog.jsonb_build_object(
                       'kind', 'chain', 'operation', 'seal', 'chain_name', ''::pg_catalog.text,
                       'chain_genesis', '0000000000000000000000000000000000000000000000000000000000000000'::pg_catalog.text)
                INTO sealed FROM "cw_v7_fixture".records s WHERE s.seq = head;
        EXCEPTION WHEN OTHERS THEN
            sealed := false;
        END;
        IF sealed THEN
            RAISE EXCEPTION 'coworker audit: chain % was retired (sealed at seq %): append '
                'refused', ''::pg_catalog.text, head
                USING ERRCODE = 'CWSEA',
                      HINT = 'a retired chain is never written again: write to another chain';
        END IF;
    END IF;
    RETURN QUERY SELECT r.seq, r.hash FROM "cw_v7_fixture".records r ORDER BY r.seq DESC LIMIT 1;
END
$$;


--
-- Name: owner_writes(); Type: FUNCTION; Schema: cw_v7_fixture; Owner: -
--

CREATE FUNCTION cw_v7_fixture.owner_writes() RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    -- Whether the rows are inserted with the rights of the owner of records (inside append()).
    -- Everything schema-qualified: it runs with the inserting session's search_path, and an
    -- operator or function of a writer's own schema must not answer for it. The name is
    -- compared exactly (a role named "OWNER" is not the role owner).
    SELECT pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) current_user
    FROM pg_catalog.pg_class c
    WHERE c.oid OPERATOR(pg_catalog.=) '"cw_v7_fixture".records'::pg_catalog.regclass
$$;


--
-- Name: refuse_change(); Type: FUNCTION; Schema: cw_v7_fixture; Owner: -
--

CREATE FUNCTION cw_v7_fixture.refuse_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'coworker audit log is append-only: % on %.% refused',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write a correction record instead';
END
$$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: keys; Type: TABLE; Schema: cw_v7_fixture; Owner: -
--

CREATE TABLE cw_v7_fixture.keys (
    subject text NOT NULL,
    key bytea NOT NULL,
    created timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT keys_key_check CHECK ((octet_length(key) = 32))
);


--
-- Name: payloads; Type: TABLE; Schema: cw_v7_fixture; Owner: -
--

CREATE TABLE cw_v7_fixture.payloads (
    seq bigint NOT NULL,
    payload bytea
);


--
-- Name: records; Type: TABLE; Schema: cw_v7_fixture; Owner: -
--

CREATE TABLE cw_v7_fixture.records (
    seq bigint NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    body bytea NOT NULL,
    dedup_key bytea,
    inserted_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    kind text,
    category text,
    operation text,
    doctype text,
    outcome text,
    flow_id text,
    step_id text,
    run_id text,
    user_id text,
    agent_id text,
    trace_id text,
    span_id text,
    recorded_at text COLLATE pg_catalog."C",
    "time" text COLLATE pg_catalog."C",
    attempt bytea,
    CONSTRAINT records_hash_check CHECK ((octet_length(hash) = 32)),
    CONSTRAINT records_prev_hash_check CHECK ((octet_length(prev_hash) = 32)),
    CONSTRAINT records_seq_check CHECK ((seq >= 1))
);


--
-- Name: schema_version; Type: TABLE; Schema: cw_v7_fixture; Owner: -
--

CREATE TABLE cw_v7_fixture.schema_version (
    version integer NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Data for Name: keys; Type: TABLE DATA; Schema: cw_v7_fixture; Owner: -
--



--
-- Data for Name: payloads; Type: TABLE DATA; Schema: cw_v7_fixture; Owner: -
--

INSERT INTO cw_v7_fixture.payloads VALUES (1, '\x7061796c6f61642d31');
INSERT INTO cw_v7_fixture.payloads VALUES (3, '\x7033');


--
-- Data for Name: records; Type: TABLE DATA; Schema: cw_v7_fixture; Owner: -
--

INSERT INTO cw_v7_fixture.records VALUES (1, '\x0000000000000000000000000000000000000000000000000000000000000000', '\x0b19766471ea2d4480a7054ac6761bf962aabf922c9ca10f0da3d022d10b0f13', '\x7b2269223a312c226b696e64223a226f7574636f6d65222c22736571223a312c22757365725f6964223a22626ac3b6726e20e2988320f09f9880227d', '\x6b31', '2026-12-02 17:45:12.765239+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'björn ☃ 😀', NULL, NULL, NULL, NULL, NULL, '\x9d4e96153e254226d300bd7db8852fc9');
INSERT INTO cw_v7_fixture.records VALUES (2, '\x0b19766471ea2d4480a7054ac6761bf962aabf922c9ca10f0da3d022d10b0f13', '\x63da3a639c8340a14270451aabba54d00a717ed9e85773beb553b1c24ab250f3', '\x7b2269223a322c226b696e64223a226f7574636f6d65222c22736571223a327d', '\x6b32', '2026-12-02 17:45:12.765811+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '\x9d4e96153e254226d300bd7db8852fc9');
INSERT INTO cw_v7_fixture.records VALUES (3, '\x63da3a639c8340a14270451aabba54d00a717ed9e85773beb553b1c24ab250f3', '\x99e55cc1f33e2d3198cb5be6dfd22599c4d5676aabc9cb58da1f709fb1277b25', '\x7b2269223a332c226b696e64223a226f7574636f6d65222c22736571223a337d', '\x6b33', '2026-12-02 17:45:12.769705+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '\x24bf676ab52aa9cd00ae54d1414fd7b4');


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: cw_v7_fixture; Owner: -
--

INSERT INTO cw_v7_fixture.schema_version VALUES (1, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (2, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (3, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (4, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (5, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (6, '2026-12-02 17:45:12.702392+00');
INSERT INTO cw_v7_fixture.schema_version VALUES (7, '2026-12-02 17:45:12.702392+00');


--
-- Name: keys keys_pkey; Type: CONSTRAINT; Schema: cw_v7_fixture; Owner: -
--

ALTER TABLE ONLY cw_v7_fixture.keys
    ADD CONSTRAINT keys_pkey PRIMARY KEY (subject);


--
-- Name: payloads payloads_pkey; Type: CONSTRAINT; Schema: cw_v7_fixture; Owner: -
--

ALTER TABLE ONLY cw_v7_fixture.payloads
    ADD CONSTRAINT payloads_pkey PRIMARY KEY (seq);


--
-- Name: records records_pkey; Type: CONSTRAINT; Schema: cw_v7_fixture; Owner: -
--

ALTER TABLE ONLY cw_v7_fixture.records
    ADD CONSTRAINT records_pkey PRIMARY KEY (seq);


--
-- Name: records records_prev_hash_key; Type: CONSTRAINT; Schema: cw_v7_fixture; Owner: -
--

ALTER TABLE ONLY cw_v7_fixture.records
    ADD CONSTRAINT records_prev_hash_key UNIQUE (prev_hash);


--
-- Name: schema_version schema_version_pkey; Type: CONSTRAINT; Schema: cw_v7_fixture; Owner: -
--

ALTER TABLE ONLY cw_v7_fixture.schema_version
    ADD CONSTRAINT schema_version_pkey PRIMARY KEY (version);


--
-- Name: records_dedup_key; Type: INDEX; Schema: cw_v7_fixture; Owner: -
--

CREATE UNIQUE INDEX records_dedup_key ON cw_v7_fixture.records USING btree (dedup_key) WHERE (dedup_key IS NOT NULL);


--
-- Name: records_flow; Type: INDEX; Schema: cw_v7_fixture; Owner: -
--

CREATE INDEX records_flow ON cw_v7_fixture.records USING btree (flow_id, seq);


--
-- Name: records_time; Type: INDEX; Schema: cw_v7_fixture; Owner: -
--

CREATE INDEX records_time ON cw_v7_fixture.records USING btree ("time");


--
-- Name: records_user; Type: INDEX; Schema: cw_v7_fixture; Owner: -
--

CREATE INDEX records_user ON cw_v7_fixture.records USING btree (user_id, seq);


--
-- Name: records records_chain; Type: TRIGGER; Schema: cw_v7_fixture; Owner: -
--

CREATE TRIGGER records_chain AFTER INSERT ON cw_v7_fixture.records REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT WHEN ((NOT cw_v7_fixture.owner_writes())) EXECUTE FUNCTION cw_v7_fixture.check_chain();

ALTER TABLE cw_v7_fixture.records ENABLE ALWAYS TRIGGER records_chain;


--
-- Name: records records_no_change; Type: TRIGGER; Schema: cw_v7_fixture; Owner: -
--

CREATE TRIGGER records_no_change BEFORE DELETE OR UPDATE ON cw_v7_fixture.records FOR EACH ROW EXECUTE FUNCTION cw_v7_fixture.refuse_change();

ALTER TABLE cw_v7_fixture.records ENABLE ALWAYS TRIGGER records_no_change;


--
-- Name: records records_no_change_stmt; Type: TRIGGER; Schema: cw_v7_fixture; Owner: -
--

CREATE TRIGGER records_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v7_fixture.records FOR EACH STATEMENT EXECUTE FUNCTION cw_v7_fixture.refuse_change();

ALTER TABLE cw_v7_fixture.records ENABLE ALWAYS TRIGGER records_no_change_stmt;


--
-- Name: schema_version schema_version_no_change; Type: TRIGGER; Schema: cw_v7_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change BEFORE DELETE OR UPDATE ON cw_v7_fixture.schema_version FOR EACH ROW EXECUTE FUNCTION cw_v7_fixture.refuse_change();

ALTER TABLE cw_v7_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change;


--
-- Name: schema_version schema_version_no_change_stmt; Type: TRIGGER; Schema: cw_v7_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v7_fixture.schema_version FOR EACH STATEMENT EXECUTE FUNCTION cw_v7_fixture.refuse_change();

ALTER TABLE cw_v7_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;


--
-- PostgreSQL database dump complete
--


