-- The debits of a group, applied as a set (issue 8): what the calls would do one after
-- another, with each account row updated once, and the grant draws, the account updates,
-- the entries and the keys of every account each written by one statement. Each call
-- keeps exactly its own outcome: replays and refused keys are answered from the stored
-- key, and the balance rule is applied per account in order over the running balance,
-- so a debit that would overdraw is refused while those before and after it still
-- apply. An account's entries chain (sequence, balance_after) as the running sum; each
-- entry's credit_type is the type of the first grant its own share of the draw comes
-- from. The auto-reload rule is checked once per account over its calls, which only
-- lower available credit, so it crosses at most once.
-- p_calls: [{"i": position in the group, "caller": name, "a": tally_move's arguments}],
-- every one a debit (amount < 0), with request ids distinct in the group, each account's
-- calls in group order. Every account is already locked by the caller (tally_apply_group).
-- Returns the answers by position of the calls it handled; an account it does not
-- handle (none, or alerts on available credit, whose crossings are per movement) gets
-- no answer and nothing written: its calls run one by one.
CREATE OR REPLACE FUNCTION tally_debit_run(p_calls jsonb) RETURNS jsonb
LANGUAGE plpgsql
-- Plans made once per session and kept (as tally_record_usage's): planning the draw and
-- the entries' statement afresh for each group would cost more than a small group.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c jsonb;
    x jsonb;
    a accounts;
    v_rows accounts[];
    v_k integer := 0;
    v_ids text[];
    v_account text;
    v_rid text;
    v_known text[];
    v_answers jsonb := '{}';
    v_now timestamptz;
    v_amount bigint;
    v_take bigint;
    -- Per account handled, in account_id order.
    v_available_before bigint[] := '{}';
    v_draws bigint[] := '{}';
    v_counts integer[] := '{}';
    -- Per applied debit, in order.
    v_n integer := 0;
    v_pos text[] := '{}';
    v_accts text[] := '{}';
    v_rids text[] := '{}';
    v_methods text[] := '{}';
    v_fps bytea[] := '{}';
    v_amounts bigint[] := '{}';
    v_afters bigint[] := '{}';
    v_seqs bigint[] := '{}';
    v_ats timestamptz[] := '{}';
    v_descs text[] := '{}';
    v_refs text[] := '{}';
    v_metas jsonb[] := '{}';
    v_offsets bigint[] := '{}';
    v_shares bigint[] := '{}';
    v_entries jsonb[];
    v_short boolean;
    v_need_ids text[];
    v_need bigint[];
BEGIN
    SELECT array_agg(DISTINCT y->'a'->>'account_id') INTO v_ids
    FROM jsonb_array_elements(p_calls) y;
    -- The catch-up, only where something is due (as tally_find_account would do at the
    -- start of the account's first call alone, stamped with that call's caller).
    v_now := clock_timestamp();
    FOR v_account IN SELECT d FROM tally_due_accounts(v_ids, v_now) d ORDER BY d LOOP
        PERFORM set_config('tally.caller', coalesce((
            SELECT y->>'caller' FROM jsonb_array_elements(p_calls) y
            WHERE y->'a'->>'account_id' = v_account LIMIT 1), ''), true);
        PERFORM tally_find_account(v_account);
    END LOOP;
    SELECT array_agg(t ORDER BY t.account_id COLLATE "C") INTO v_rows FROM accounts t
    WHERE t.account_id = ANY (v_ids) AND NOT t.available_alerts;
    IF v_rows IS NULL THEN
        RETURN v_answers;
    END IF;
    -- The keys already stored, by one index probe per key (an array, not a join the
    -- planner could turn into a scan of the whole table).
    SELECT array_agg(request_id) INTO v_known FROM idempotency_keys
    WHERE request_id = ANY (ARRAY(SELECT y->'a'->>'request_id'
                                  FROM jsonb_array_elements(p_calls) y));
    v_now := clock_timestamp();
    -- The calls by account (in account_id order), each account's in group order.
    FOR c IN SELECT y.value FROM jsonb_array_elements(p_calls) WITH ORDINALITY y
             ORDER BY (y.value->'a'->>'account_id') COLLATE "C", y.ordinality LOOP
        x := c->'a';
        IF v_k = 0 OR v_rows[v_k].account_id IS DISTINCT FROM x->>'account_id' THEN
            -- The next account handled, if this call's account is one.
            IF v_k < cardinality(v_rows) AND v_rows[v_k + 1].account_id = x->>'account_id' THEN
                v_k := v_k + 1;
                a := v_rows[v_k];
                v_available_before := v_available_before || (a.balance - a.reserved);
                v_draws := v_draws || 0::bigint;
                v_counts := v_counts || 0;
                a.balance_updated_at := greatest(a.balance_updated_at, v_now);
            ELSE
                CONTINUE;
            END IF;
        END IF;
        v_rid := x->>'request_id';
        IF v_rid = ANY (v_known) THEN
            v_answers := v_answers || jsonb_build_object(c->>'i', tally_replay(
                v_rid, x->>'method', decode(x->>'fingerprint', 'hex')));
            CONTINUE;
        END IF;
        v_amount := (x->>'amount')::bigint;
        IF NOT tally_fits(a, -v_amount) THEN
            v_answers := v_answers || jsonb_build_object(c->>'i', tally_insufficient(a, -v_amount));
            CONTINUE;
        END IF;
        v_take := least(-v_amount, greatest(a.balance, 0));
        v_offsets := v_offsets || v_draws[v_k];
        v_shares := v_shares || v_take;
        v_draws[v_k] := v_draws[v_k] + v_take;
        v_counts[v_k] := v_counts[v_k] + 1;
        a.balance := a.balance + v_amount;
        a.last_sequence := a.last_sequence + 1;
        v_rows[v_k] := a;
        v_n := v_n + 1;
        v_pos := v_pos || (c->>'i');
        v_accts := v_accts || a.account_id;
        v_rids := v_rids || v_rid;
        v_methods := v_methods || (x->>'method');
        v_fps := v_fps || decode(x->>'fingerprint', 'hex');
        v_amounts := v_amounts || v_amount;
        v_afters := v_afters || a.balance;
        v_seqs := v_seqs || a.last_sequence;
        v_ats := v_ats || a.balance_updated_at;
        v_descs := v_descs || (x->>'description');
        v_refs := v_refs || (x->>'reference');
        v_metas := v_metas || CASE WHEN coalesce(c->>'caller', '') <> ''
            THEN (x->>'metadata')::jsonb || jsonb_build_object('caller', c->>'caller')
            ELSE (x->>'metadata')::jsonb END;
    END LOOP;
    IF v_n = 0 THEN
        RETURN v_answers;
    END IF;
    -- The accounts, once each: the running state the loop left in v_rows.
    UPDATE accounts t
    SET balance = r.balance, last_sequence = r.last_sequence,
        balance_updated_at = r.balance_updated_at
    FROM unnest(v_rows) r
    WHERE t.account_id = ANY (v_ids)  -- by the key's index, whatever the planner guesses
      AND t.account_id = r.account_id AND r.last_sequence <> t.last_sequence;
    -- One draw for all: each account's grants in draw order until its draw is covered.
    -- Each entry's type is that of the grant holding the first credit of its share.
    -- The entries carry their callers already; the trigger then adds nothing.
    PERFORM set_config('tally.caller', '', true);
    SELECT array_agg((v_rows[k]).account_id), array_agg(v_draws[k]) INTO v_need_ids, v_need
    FROM generate_subscripts(v_draws, 1) k
    WHERE v_draws[k] > 0;
    -- (Each account's grants by one index scan: a join the planner could turn into a
    -- scan of the whole table is avoided, as for the keys above.)
    WITH drawn AS (
        UPDATE grants t SET remaining = t.remaining - l.taken
        FROM (SELECT n.account_id, g.grant_id, g.grant_type, g.remaining, g.ahead,
                     least(g.remaining, n.draw - g.ahead) AS taken
              FROM unnest(v_need_ids, v_need) AS n (account_id, draw),
              LATERAL (SELECT grant_id, grant_type, remaining,
                              (sum(remaining) OVER w - remaining)::bigint AS ahead
                       FROM grants
                       WHERE account_id = n.account_id AND NOT spent
                       WINDOW w AS (ORDER BY priority, expires_at NULLS LAST, created_at,
                                             grant_id)) g
              WHERE g.ahead < n.draw) l
        WHERE t.grant_id = l.grant_id
        RETURNING l.account_id, l.ahead, l.remaining, l.grant_type, l.taken
    ), written AS (
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at, credit_type)
        SELECT e.account_id, e.sequence, 'debit', e.amount, e.balance_after,
               e.description, e.reference, e.metadata, e.request_id, e.created_at,
               (SELECT d.grant_type FROM drawn d
                WHERE e.share > 0 AND d.account_id = e.account_id
                  AND d.ahead <= e.offset_ AND e.offset_ < d.ahead + d.remaining)
        FROM unnest(v_accts, v_seqs, v_amounts, v_afters, v_descs, v_refs, v_metas, v_rids,
                    v_ats, v_offsets, v_shares)
             AS e (account_id, sequence, amount, balance_after, description, reference,
                   metadata, request_id, created_at, offset_, share)
        RETURNING *
    )
    -- Each account's draw takes at most its need, so the totals are equal only when
    -- every account's grants covered it.
    SELECT (SELECT sum(u.need) FROM unnest(v_need) u (need)) IS DISTINCT FROM
           (SELECT sum(d.taken) FROM drawn d),
           (SELECT array_agg(jsonb_build_object('entry', to_jsonb(w))
                             ORDER BY w.account_id COLLATE "C", w.sequence)
            FROM written w)
    INTO v_short, v_entries;
    IF v_short AND v_need IS NOT NULL THEN
        RAISE EXCEPTION 'grants do not cover the balances of %', v_need_ids
            USING ERRCODE = 'TA901';
    END IF;
    INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
    SELECT * FROM unnest(v_rids, v_methods, v_fps, v_entries);
    SELECT v_answers || jsonb_object_agg(
               t.pos, jsonb_build_object('replayed', false, 'response', t.entry))
    INTO v_answers FROM unnest(v_pos, v_entries) AS t (pos, entry);
    FOR v_k IN 1 .. cardinality(v_rows) LOOP
        IF v_rows[v_k].auto_reload_enabled AND v_counts[v_k] > 0 THEN
            PERFORM tally_maybe_reload(v_rows[v_k], v_available_before[v_k]);
        END IF;
    END LOOP;
    RETURN v_answers;
END $$;

-- Group commit: several callers' movements, gathered by one server process, applied by
-- one call in one transaction (one WAL flush, each account's lock taken once).
--
-- p_calls is a JSON array of {"f": function, "caller": name, "a": {arguments}}; the
-- arguments are the named parameters of the function without their `p_` prefix
-- (fingerprints as hex, metadata and grants as JSON text). The answer is an array of
-- the same length holding each function's own answer: {"replayed", "response"}, or
-- {"error": {"sqlstate", "detail"}} for a refusal (sql/15_refusals.sql).
--
-- Every account the group touches is locked first, in account_id order, so two groups
-- (of this or another process) never wait on each other in a cycle. An account's debits
-- are then applied as a set where they can be (tally_debit_run, same outcomes), and the
-- other calls run one after another, each exactly as it would alone. A refusal is returned before its
-- call writes anything, so it never undoes or changes a neighbour's work, and no
-- subtransaction is needed (a subtransaction per call makes every waiter on the hot
-- account's row pay for each of them: measured 3x slower under contention). Anything
-- raised (the statement timeout, a lost connection, an assertion, a same-key race with
-- another process) fails the whole group and nothing of it is written; the server then
-- answers UNAVAILABLE, or runs each call again alone when the error was not transient.
CREATE OR REPLACE FUNCTION tally_apply_group(p_calls jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    a jsonb;
    r jsonb;
    i bigint;
    v_run jsonb;
    v_answers jsonb := '{}';
    v_results jsonb[] := '{}';
BEGIN
    PERFORM 1 FROM accounts
    WHERE account_id IN (
        SELECT x->'a'->>'account_id' FROM jsonb_array_elements(p_calls) x
        UNION
        SELECT h.account_id FROM holds h
        WHERE h.reservation_id IN (
            SELECT (x->'a'->>'reservation_id')::uuid FROM jsonb_array_elements(p_calls) x
            WHERE x->'a' ? 'reservation_id')
    )
    ORDER BY account_id FOR UPDATE;
    -- Set-based first: in a group of plain movements with distinct keys (so no call of
    -- the group can see another's key or account), the calls of every account whose
    -- calls are all debits, as one run (tally_debit_run; a lone debit is cheaper as
    -- itself). Every other call runs on its own below, in order.
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_calls) x
                   WHERE x->>'f' IS DISTINCT FROM 'tally_move')
       AND (SELECT count(DISTINCT x->'a'->>'request_id') = count(*)
            FROM jsonb_array_elements(p_calls) x) THEN
        SELECT jsonb_agg(r.c ORDER BY r.i) INTO v_run
        FROM (SELECT x.value || jsonb_build_object('i', x.ordinality) AS c, x.ordinality AS i,
                     bool_and(x.value->'a'->>'type' = 'debit'
                              AND (x.value->'a'->>'amount')::bigint < 0)
                         OVER (PARTITION BY x.value->'a'->>'account_id') AS debits
              FROM jsonb_array_elements(p_calls) WITH ORDINALITY x) r
        WHERE r.debits;
        IF jsonb_array_length(v_run) > 1 THEN
            v_answers := tally_debit_run(v_run);
        END IF;
    END IF;
    FOR c, i IN SELECT value, ordinality FROM jsonb_array_elements(p_calls) WITH ORDINALITY
    LOOP
        IF v_answers ? i::text THEN
            v_results := v_results || (v_answers -> i::text);
            CONTINUE;
        END IF;
        a := c->'a';
        PERFORM set_config('tally.caller', coalesce(c->>'caller', ''), true);
        CASE c->>'f'
        WHEN 'tally_move' THEN
            r := tally_move(
                p_request_id => a->>'request_id',
                p_fingerprint => decode(a->>'fingerprint', 'hex'),
                p_method => a->>'method',
                p_account_id => a->>'account_id',
                p_type => a->>'type',
                p_amount => (a->>'amount')::bigint,
                p_description => a->>'description',
                p_reference => a->>'reference',
                p_metadata => (a->>'metadata')::jsonb,
                p_grant => (a->>'grant')::jsonb);
        WHEN 'tally_reserve' THEN
            r := tally_reserve(
                p_request_id => a->>'request_id',
                p_fingerprint => decode(a->>'fingerprint', 'hex'),
                p_account_id => a->>'account_id',
                p_amount => (a->>'amount')::bigint,
                p_ttl_seconds => (a->>'ttl_seconds')::bigint,
                p_reference => a->>'reference',
                p_metadata => (a->>'metadata')::jsonb);
        WHEN 'tally_capture' THEN
            r := tally_capture(
                p_request_id => a->>'request_id',
                p_fingerprint => decode(a->>'fingerprint', 'hex'),
                p_reservation_id => (a->>'reservation_id')::uuid,
                p_amount => (a->>'amount')::bigint,
                p_description => a->>'description',
                p_metadata => (a->>'metadata')::jsonb);
        WHEN 'tally_release' THEN
            r := tally_release(
                p_request_id => a->>'request_id',
                p_fingerprint => decode(a->>'fingerprint', 'hex'),
                p_reservation_id => (a->>'reservation_id')::uuid);
        ELSE
            RAISE EXCEPTION 'not a grouped function: %', c->>'f' USING ERRCODE = 'TA999';
        END CASE;
        v_results := v_results || r;
    END LOOP;
    RETURN to_jsonb(v_results);
END $$;
