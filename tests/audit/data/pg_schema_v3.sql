-- A schema-version-3 audit store (3 records) made by coworker at commit 918c005 (before
-- schema version 4), dumped with pg_dump --inserts; tests load it under another schema name.
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
-- Name: cw_v3_fixture; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA cw_v3_fixture;


--
-- Name: check_chain(); Type: FUNCTION; Schema: cw_v3_fixture; Owner: -
--

CREATE FUNCTION cw_v3_fixture.check_chain() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT n.seq INTO bad FROM new_rows n
        LEFT JOIN "cw_v3_fixture".records p ON p.seq = n.seq - 1
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


--
-- Name: lock_head(integer); Type: FUNCTION; Schema: cw_v3_fixture; Owner: -
--

CREATE FUNCTION cw_v3_fixture.lock_head(lock_key integer) RETURNS TABLE(seq bigint, hash bytea)
    LANGUAGE plpgsql
    AS $$
BEGIN
    -- Commit without waiting for the WAL flush (the store waits for it after the lock is
    -- released, see PostgresStore._flush).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(1668249458, lock_key);
    -- A VOLATILE function takes a new snapshot for each statement (READ COMMITTED): this
    -- reads the head as of after the lock was granted.
    RETURN QUERY SELECT r.seq, r.hash FROM "cw_v3_fixture".records r ORDER BY r.seq DESC LIMIT 1;
END
$$;


--
-- Name: refuse_change(); Type: FUNCTION; Schema: cw_v3_fixture; Owner: -
--

CREATE FUNCTION cw_v3_fixture.refuse_change() RETURNS trigger
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
-- Name: keys; Type: TABLE; Schema: cw_v3_fixture; Owner: -
--

CREATE TABLE cw_v3_fixture.keys (
    subject text NOT NULL,
    key bytea NOT NULL,
    created timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT keys_key_check CHECK ((octet_length(key) = 32))
);


--
-- Name: payloads; Type: TABLE; Schema: cw_v3_fixture; Owner: -
--

CREATE TABLE cw_v3_fixture.payloads (
    seq bigint NOT NULL,
    payload bytea
);


--
-- Name: records; Type: TABLE; Schema: cw_v3_fixture; Owner: -
--

CREATE TABLE cw_v3_fixture.records (
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
    CONSTRAINT records_hash_check CHECK ((octet_length(hash) = 32)),
    CONSTRAINT records_prev_hash_check CHECK ((octet_length(prev_hash) = 32)),
    CONSTRAINT records_seq_check CHECK ((seq >= 1))
);


--
-- Name: schema_version; Type: TABLE; Schema: cw_v3_fixture; Owner: -
--

CREATE TABLE cw_v3_fixture.schema_version (
    version integer NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Data for Name: keys; Type: TABLE DATA; Schema: cw_v3_fixture; Owner: -
--



--
-- Data for Name: payloads; Type: TABLE DATA; Schema: cw_v3_fixture; Owner: -
--

INSERT INTO cw_v3_fixture.payloads VALUES (1, '\x7b22696e707574223a2278222c226f7574707574223a2279227d');


--
-- Data for Name: records; Type: TABLE DATA; Schema: cw_v3_fixture; Owner: -
--

INSERT INTO cw_v3_fixture.records VALUES (1, '\x0000000000000000000000000000000000000000000000000000000000000000', '\x6c8aae4d595d2dfa95be964ad90ca91b9bb8fa76f37d59ba6ca8046810d6b090', '\x7b2263617465676f7279223a2273746174652d6368616e6765222c22666c6f775f6964223a226631222c2269223a312c226b696e64223a226f7574636f6d65222c226f7065726174696f6e223a22637265617465222c22736571223a312c227374617274223a22323032362d30312d30315430303a30303a30302e3030303030303030305a222c22757365725f6964223a22616c696365227d', NULL, '2026-12-01 23:33:56.846364+00', 'outcome', 'state-change', 'create', NULL, NULL, 'f1', NULL, NULL, 'alice', NULL, NULL, NULL, NULL, '2026-01-01T00:00:00.000000000Z');
INSERT INTO cw_v3_fixture.records VALUES (2, '\x6c8aae4d595d2dfa95be964ad90ca91b9bb8fa76f37d59ba6ca8046810d6b090', '\x68a5ca338a7a3ef66738665b556b67bffaccf147329f5815184f466bdd42cdc9', '\x7b2263617465676f7279223a2273746174652d6368616e6765222c22666c6f775f6964223a226631222c2269223a322c226b696e64223a226f7574636f6d65222c226f7065726174696f6e223a22757064617465222c22736571223a322c227374617274223a22323032362d30312d30315430303a30303a30312e3030303030303030305a222c22757365725f6964223a22626ac3b6726e20e2988320f09f9880227d', NULL, '2026-12-01 23:33:56.846822+00', 'outcome', 'state-change', 'update', NULL, NULL, 'f1', NULL, NULL, 'björn ☃ 😀', NULL, NULL, NULL, NULL, '2026-01-01T00:00:01.000000000Z');
INSERT INTO cw_v3_fixture.records VALUES (3, '\x68a5ca338a7a3ef66738665b556b67bffaccf147329f5815184f466bdd42cdc9', '\x249c52ea0933a394e8da3cd5eb729ca171cea1a1bc3e973cbd4abd8199be02ab', '\x7b22626967223a393030373139393235343734303939312c2263617465676f7279223a2273746174652d6368616e6765222c2266223a312e35652d372c2269223a332c226b696e64223a22696e74656e74222c226e223a6e756c6c2c226e6567223a2d393030373139393235343734303939312c226f7065726174696f6e223a2264656c657465222c22736571223a332c2274223a747275657d', NULL, '2026-12-01 23:33:56.851445+00', 'intent', 'state-change', 'delete', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: cw_v3_fixture; Owner: -
--

INSERT INTO cw_v3_fixture.schema_version VALUES (1, '2026-12-01 23:33:56.805562+00');
INSERT INTO cw_v3_fixture.schema_version VALUES (2, '2026-12-01 23:33:56.805562+00');
INSERT INTO cw_v3_fixture.schema_version VALUES (3, '2026-12-01 23:33:56.805562+00');


--
-- Name: keys keys_pkey; Type: CONSTRAINT; Schema: cw_v3_fixture; Owner: -
--

ALTER TABLE ONLY cw_v3_fixture.keys
    ADD CONSTRAINT keys_pkey PRIMARY KEY (subject);


--
-- Name: payloads payloads_pkey; Type: CONSTRAINT; Schema: cw_v3_fixture; Owner: -
--

ALTER TABLE ONLY cw_v3_fixture.payloads
    ADD CONSTRAINT payloads_pkey PRIMARY KEY (seq);


--
-- Name: records records_pkey; Type: CONSTRAINT; Schema: cw_v3_fixture; Owner: -
--

ALTER TABLE ONLY cw_v3_fixture.records
    ADD CONSTRAINT records_pkey PRIMARY KEY (seq);


--
-- Name: records records_prev_hash_key; Type: CONSTRAINT; Schema: cw_v3_fixture; Owner: -
--

ALTER TABLE ONLY cw_v3_fixture.records
    ADD CONSTRAINT records_prev_hash_key UNIQUE (prev_hash);


--
-- Name: schema_version schema_version_pkey; Type: CONSTRAINT; Schema: cw_v3_fixture; Owner: -
--

ALTER TABLE ONLY cw_v3_fixture.schema_version
    ADD CONSTRAINT schema_version_pkey PRIMARY KEY (version);


--
-- Name: records_dedup_key; Type: INDEX; Schema: cw_v3_fixture; Owner: -
--

CREATE UNIQUE INDEX records_dedup_key ON cw_v3_fixture.records USING btree (dedup_key) WHERE (dedup_key IS NOT NULL);


--
-- Name: records_flow; Type: INDEX; Schema: cw_v3_fixture; Owner: -
--

CREATE INDEX records_flow ON cw_v3_fixture.records USING btree (flow_id, seq);


--
-- Name: records_time; Type: INDEX; Schema: cw_v3_fixture; Owner: -
--

CREATE INDEX records_time ON cw_v3_fixture.records USING btree ("time");


--
-- Name: records_user; Type: INDEX; Schema: cw_v3_fixture; Owner: -
--

CREATE INDEX records_user ON cw_v3_fixture.records USING btree (user_id, seq);


--
-- Name: records records_chain; Type: TRIGGER; Schema: cw_v3_fixture; Owner: -
--

CREATE TRIGGER records_chain AFTER INSERT ON cw_v3_fixture.records REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cw_v3_fixture.check_chain();

ALTER TABLE cw_v3_fixture.records ENABLE ALWAYS TRIGGER records_chain;


--
-- Name: records records_no_change; Type: TRIGGER; Schema: cw_v3_fixture; Owner: -
--

CREATE TRIGGER records_no_change BEFORE DELETE OR UPDATE ON cw_v3_fixture.records FOR EACH ROW EXECUTE FUNCTION cw_v3_fixture.refuse_change();

ALTER TABLE cw_v3_fixture.records ENABLE ALWAYS TRIGGER records_no_change;


--
-- Name: records records_no_change_stmt; Type: TRIGGER; Schema: cw_v3_fixture; Owner: -
--

CREATE TRIGGER records_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v3_fixture.records FOR EACH STATEMENT EXECUTE FUNCTION cw_v3_fixture.refuse_change();

ALTER TABLE cw_v3_fixture.records ENABLE ALWAYS TRIGGER records_no_change_stmt;


--
-- Name: schema_version schema_version_no_change; Type: TRIGGER; Schema: cw_v3_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change BEFORE DELETE OR UPDATE ON cw_v3_fixture.schema_version FOR EACH ROW EXECUTE FUNCTION cw_v3_fixture.refuse_change();

ALTER TABLE cw_v3_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change;


--
-- Name: schema_version schema_version_no_change_stmt; Type: TRIGGER; Schema: cw_v3_fixture; Owner: -
--

CREATE TRIGGER schema_version_no_change_stmt BEFORE DELETE OR UPDATE OR TRUNCATE ON cw_v3_fixture.schema_version FOR EACH STATEMENT EXECUTE FUNCTION cw_v3_fixture.refuse_change();

ALTER TABLE cw_v3_fixture.schema_version ENABLE ALWAYS TRIGGER schema_version_no_change_stmt;


--
-- PostgreSQL database dump complete
--


