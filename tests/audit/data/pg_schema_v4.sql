-- A schema-version-4 audit store (3 records: a payload, dedup keys) made by coworker at commit 40dda74
-- (before schema version 5), dumped with pg_dump --inserts; tests load it under another schema name.
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
-- Name: cw_v4_fixture; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA cw_v4_fixture;


--
-- Name: append(integer, bytea, bytea[], bytea[], bytea[], bytea[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[]); Type: FUNCTION; Schema: cw_v4_fixture; Owner: -
--

CREATE FUNCTION cw_v4_fixture.append(lock_key integer, attempt bytea, before bytea[], after bytea[], payload bytea[], dedup bytea[], kind text[], category text[], operation text[], doctype text[], outcome text[], flow_id text[], step_id text[], run_id text[], user_id text[], agent_id text[], trace_id text[], span_id text[], recorded_at text[], "time" text[]) RETURNS TABLE(i integer, seq bigint, prev_hash bytea, hash bytea)
    LANGUAGE plpgsql
    AS $$
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
    PERFORM pg_advisory_xact_lock(1668249458, lock_key);
    -- A new statement, a new snapshot (READ COMMITTED): the head as of after the lock.
    SELECT r.seq, r.hash INTO head, prev FROM "cw_v4_fixture".records r ORDER BY r.seq DESC LIMIT 1;
    IF head IS NULL THEN
        head := 0;
        prev := decode(repeat('00', 32), 'hex');
    END IF;
    IF dedup IS NOT NULL THEN
        FOR k IN 1..n LOOP
            CONTINUE WHEN dedup[k] IS NULL;
            IF dedup[k] = ANY(seen) OR EXISTS (
                SELECT 1 FROM "cw_v4_fixture".records d WHERE d.dedup_key = dedup[k]
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
    INSERT INTO "cw_v4_fixture".records (seq, prev_hash, hash, body, dedup_key, kind, category,
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
        INSERT INTO "cw_v4_fixture".payloads (seq, payload)
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


--
-- Name: check_chain(); Type: FUNCTION; Schema: cw_v4_fixture; Owner: -
--

CREATE FUNCTION cw_v4_fixture.check_chain() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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
           AND (SELECT p.hash FROM "cw_v4_fixture".records p WHERE p.seq = n.seq - 1)
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


--
-- Name: lock_head(integer); Type: FUNCTION; Schema: cw_v4_fixture; Owner: -
--

CREATE FUNCTION cw_v4_fixture.lock_head(lock_key integer) RETURNS TABLE(seq bigint, hash bytea)
    LANGUAGE plpgsql
    AS $$
BEGIN
    -- Commit without waiting for the WAL flush (the store waits for it after the lock is
    -- released, see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(1668249458, lock_key);
    -- A VOLATILE function takes a new snapshot for each statement (READ COMMITTED): this
    -- reads the head as of after the lock was granted.
    RETURN QUERY SELECT r.seq, r.hash FROM "cw_v4_fixture".records r ORDER BY r.seq DESC LIMIT 1;
END
$$;


--
-- Name: refuse_change(); Type: FUNCTION; Schema: cw_v4_fixture; Owner: -
--

CREATE FUNCTION cw_v4_fixture.refuse_change() RETURNS trigger
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
-- Name: keys; Type: TABLE; Schema: cw_v4_fixture; Owner: -
--

CREATE TABLE cw_v4_fixture.keys (
    subject text NOT NULL,
    key bytea NOT NULL,
    created timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT keys_key_check CHECK ((octet_length(key) = 32))
);


--
-- Name: payloads; Type: TABLE; Schema: cw_v4_fixture; Owner: -
--

CREATE TABLE cw_v4_fixture.payloads (
    seq bigint NOT NULL,
    payload bytea
);


--
-- Name: records; Type: TABLE; Schema: cw_v4_fixture; Owner: -
--

CREATE TABLE cw_v4_fixture.records (
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
-- Name: schema_version; Type: TABLE; Schema: cw_v4_fixture; Owner: -
--

CREATE TABLE cw_v4_fixture.schema_version (
    version integer NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Data for Name: keys; Type: TABLE DATA; Schema: cw_v4_fixture; Owner: -
--



--
-- Data for Name: payloads; Type: TABLE DATA; Schema: cw_v4_fixture; Owner: -
--

INSERT INTO cw_v4_fixture.payloads VALUES (1, '\x7061796c6f61642d31');
INSERT INTO cw_v4_fixture.payloads VALUES (3, '\x7033');


--
-- Data for Name: records; Type: TABLE DATA; Schema: cw_v4_fixture; Owner: -
--

INSERT INTO cw_v4_fixture.records VALUES (1, '\x0000000000000000000000000000000000000000000000000000000000000000', '\x0b19766471ea2d4480a7054ac6761bf962aabf922c9ca10f0da3d022d10b0f13', '\x7b2269223a312c226b696e64223a226f7574636f6d65222c22736571223a312c22757365725f6964223a22626ac3b6726e20e2988320f09f9880227d', NULL, '2026-12-02 02:17:37.794591+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'björn ☃ 😀', NULL, NULL, NULL, NULL, NULL, '\x5d9222b569855829744c3ecdf0f36c7c');
INSERT INTO cw_v4_fixture.records VALUES (2, '\x0b19766471ea2d4480a7054ac6761bf962aabf922c9ca10f0da3d022d10b0f13', '\x63da3a639c8340a14270451aabba54d00a717ed9e85773beb553b1c24ab250f3', '\x7b2269223a322c226b696e64223a226f7574636f6d65222c22736571223a327d', '\x6b32', '2026-12-02 02:17:37.805279+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '\x69c3de89cfffda2c6a593c0ef5f62cb4');
INSERT INTO cw_v4_fixture.records VALUES (3, '\x63da3a639c8340a14270451aabba54d00a717ed9e85773beb553b1c24ab250f3', '\x99e55cc1f33e2d3198cb5be6dfd22599c4d5676aabc9cb58da1f709fb1277b25', '\x7b2269223a332c226b696e64223a226f7574636f6d65222c22736571223a337d', '\x6b33', '2026-12-02 02:17:37.80539+00', 'outcome', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '\x69c3de89cfffda2c6a593c0ef5f62cb4');


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: cw_v4_fixture; Owner: -
--

INSERT INTO cw_v4_fixture.schema_version VALUES (1, '2026-12-02 02:17:37.674924+00');
INSERT INTO cw_v4_fixture.schema_version VALUES (2, '2026-12-02 02:17:37.674924+00');
INSERT INTO cw_v4_fixture.schema_version VALUES (3, '2026-12-02 02:17:37.674924+00');
INSERT INTO cw_v4_fixture.schema_version VALUES (4, '2026-12-02 02:17:37.674924+00');


--
-- Name: keys keys_pkey; Type: CONSTRAINT; Schema: cw_v4_fixture; Owner: -
--

ALTER TABLE ONLY cw_v4_fixture.keys
    ADD CONSTRAINT keys_pkey PRIMARY KEY (subject);


--
-- Name: payloads payloads_pkey; Type: CONSTRAINT; Schema: cw_v4_fixture; Owner: -
--

ALTER TABLE ONLY cw_v4_fixture.payloads
    ADD CONSTRAINT payloads_pkey PRIMARY KEY (seq);


--
-- Name: records records_pkey; Type: CONSTRAINT; Schema: cw_v4_fixture; Owner: -
--

ALTER TABLE ONLY cw_v4_fixture.records
    ADD CONSTRAINT records_pkey PRIMARY KEY (seq);


--
-- Name: records records_prev_hash_key; Type: CONSTRAINT; Schema: cw_v4_fixture; Owner: -
--

ALTER TABLE ONLY cw_v4_fixture.records
    ADD CONSTRAINT records_prev_hash_key UNIQUE (prev_hash);


--
-- Name: schema_version schema_version_pkey; Type: CONSTRAINT; Schema: cw_v4_fixture; Owner: -
--

ALTER TABLE ONLY cw_v4_fixture.schema_version
    ADD CONSTRAINT schema_version_pkey PRIMARY KEY (version);


--
-- Name: records_dedup_key; Type: INDEX; Schema: cw_v4_fixture; Owner: -
--

CREATE UNIQUE INDEX records_dedup_key ON cw_v4_fixture.records USING btree (dedup_key) WHERE (dedup_key IS NOT NULL);


--
-- Name: records_flow; Type: INDEX; Schema: cw_v4_fixture; Owner: -
--

CREATE INDEX records_flow ON cw_v4_fixture.records USING btree (flow_id, seq);


--
-- Name: records_time; Type: INDEX; Schema: cw_v4_fixture; Owner: -
--

CREATE INDEX records_time ON cw_v4_fixture.records USING btree ("time");


--
-- Name: records_user; Type: INDEX; Schema: cw_v4_fixture; Owner: -
--

CREATE INDEX records_user ON cw_v4_fixture.records USING btree (user_id, seq);


--
-- Name: records records_chain; Type: TRIGGER; Schema: cw_v4_fixture; Owner: -
--

CREATE TRIGGER records_chain AFTER INSERT ON cw_v4_fixture.records REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cw_v4_fixture.check_chain();

ALTER TABLE cw_v4_fixture.records ENABLE ALWAYS TRIGGER records_chain;


--
-- Name: records records_no_change; Type: TRIGGER; Schema: cw_v4_fixture; Owner: -
--

CREATE TRIGGER records_no_change BEFORE DELETE OR UPDATE ON cw_v4_fixture.records FOR EACH ROW EXECUTE FUNCTION cw_v4_fixture.refuse_change();

ALTER TABLE cw_v4_fixture.records ENABLE ALWAYS TRIGGER records_no_change;


--
-- Name: records records_no_change_stmt; Type: TRIGGER; Schema: cw_v4_fixture; Owner: -
--

CREATE TRIGGER records_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v4_fixture.records FOR EACH STATEMENT EXECUTE FUNCTION cw_v4_fixture.refuse_change();

ALTER TABLE cw_v4_fixture.records ENABLE ALWAYS TRIGGER records_no_change_stmt;


--
-- Name: schema_version schema_version_no_change; Type: TRIGGER; Schema: cw_v4_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change BEFORE DELETE OR UPDATE ON cw_v4_fixture.schema_version FOR EACH ROW EXECUTE FUNCTION cw_v4_fixture.refuse_change();

ALTER TABLE cw_v4_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change;


--
-- Name: schema_version schema_version_no_change_stmt; Type: TRIGGER; Schema: cw_v4_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v4_fixture.schema_version FOR EACH STATEMENT EXECUTE FUNCTION cw_v4_fixture.refuse_change();

ALTER TABLE cw_v4_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;


--
-- PostgreSQL database dump complete
--


