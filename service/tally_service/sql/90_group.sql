-- The debits of one account in a group, applied as a set (issue 8): what the calls would
-- do one after another, with the account row updated once, the grants drawn once, and
-- the entries and keys each written by one multi-row INSERT. Each call keeps exactly its
-- own outcome: replays and refused keys are answered from the stored key, and the
-- balance rule is applied in order over the running balance, so a debit that would
-- overdraw is refused while those before and after it still apply. The entries' chain
-- (sequence, balance_after) is the running sum; each entry's credit_type is the type of
-- the first grant its own share of the draw comes from. The auto-reload rule is checked
-- once over the run, which only lowers available credit, so it crosses at most once.
-- p_calls: [{"i": position in the group, "caller": name, "a": tally_move's arguments}],
-- every one a debit (amount < 0) of p_account_id, with request ids distinct in the group.
-- Returns the answers by position, or NULL when it does not handle this account (none,
-- or alerts on available credit, whose crossings are per movement): nothing written then.
CREATE OR REPLACE FUNCTION tally_debit_run(p_account_id text, p_calls jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    c jsonb;
    x jsonb;
    v_rid text;
    v_known text[];
    v_answers jsonb := '{}';
    v_available_before bigint;
    v_balance bigint;
    v_reserved bigint;
    v_amount bigint;
    v_take bigint;
    v_draw bigint := 0;
    v_n integer := 0;
    -- Per applied debit, in order.
    v_pos text[] := '{}';
    v_rids text[] := '{}';
    v_methods text[] := '{}';
    v_fps bytea[] := '{}';
    v_amounts bigint[] := '{}';
    v_afters bigint[] := '{}';
    v_descs text[] := '{}';
    v_refs text[] := '{}';
    v_metas jsonb[] := '{}';
    v_offsets bigint[] := '{}';
    v_shares bigint[] := '{}';
    v_types text[] := '{}';
    g record;
    v_ahead bigint := 0;
    v_j integer := 1;
    v_entries jsonb[];
    v_r jsonb;
BEGIN
    -- The catch-up runs once, as at the start of the run's first call alone (and stamps
    -- what it writes with that call's caller).
    PERFORM set_config('tally.caller', coalesce(p_calls->0->>'caller', ''), true);
    a := tally_find_account(p_account_id);
    IF a.account_id IS NULL OR a.available_alerts THEN
        RETURN NULL;
    END IF;
    -- The keys already stored, by one index probe per key (an array, not a join the
    -- planner could turn into a scan of the whole table).
    SELECT array_agg(request_id) INTO v_known FROM idempotency_keys
    WHERE request_id = ANY (ARRAY(SELECT y->'a'->>'request_id'
                                  FROM jsonb_array_elements(p_calls) y));
    v_available_before := a.balance - a.reserved;
    v_balance := a.balance;
    v_reserved := a.reserved;
    FOR c IN SELECT value FROM jsonb_array_elements(p_calls) LOOP
        x := c->'a';
        v_rid := x->>'request_id';
        IF v_rid = ANY (v_known) THEN
            v_answers := v_answers || jsonb_build_object(c->>'i', tally_replay(
                v_rid, x->>'method', decode(x->>'fingerprint', 'hex')));
            CONTINUE;
        END IF;
        v_amount := (x->>'amount')::bigint;
        a.balance := v_balance;
        IF NOT tally_fits(a, -v_amount) THEN
            v_answers := v_answers || jsonb_build_object(c->>'i', tally_insufficient(a, -v_amount));
            CONTINUE;
        END IF;
        v_take := least(-v_amount, greatest(v_balance, 0));
        v_offsets := v_offsets || v_draw;
        v_shares := v_shares || v_take;
        v_draw := v_draw + v_take;
        v_balance := v_balance + v_amount;
        v_n := v_n + 1;
        v_pos := v_pos || (c->>'i');
        v_rids := v_rids || v_rid;
        v_methods := v_methods || (x->>'method');
        v_fps := v_fps || decode(x->>'fingerprint', 'hex');
        v_amounts := v_amounts || v_amount;
        v_afters := v_afters || v_balance;
        v_descs := v_descs || (x->>'description');
        v_refs := v_refs || (x->>'reference');
        v_metas := v_metas || CASE WHEN coalesce(c->>'caller', '') <> ''
            THEN (x->>'metadata')::jsonb || jsonb_build_object('caller', c->>'caller')
            ELSE (x->>'metadata')::jsonb END;
        v_types := v_types || NULL::text;
    END LOOP;
    IF v_n = 0 THEN
        RETURN v_answers;
    END IF;
    -- One draw for the run: the grants in draw order until v_draw is covered; each
    -- entry's type is that of the grant holding the first credit of its share.
    IF v_draw > 0 THEN
        FOR g IN
            SELECT grant_id, remaining, grant_type FROM grants
            WHERE account_id = p_account_id AND NOT spent
            ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
        LOOP
            UPDATE grants SET remaining = remaining - least(g.remaining, v_draw - v_ahead)
            WHERE grant_id = g.grant_id;
            WHILE v_j <= v_n AND v_offsets[v_j] < v_ahead + g.remaining LOOP
                IF v_shares[v_j] > 0 THEN
                    v_types[v_j] := g.grant_type;
                END IF;
                v_j := v_j + 1;
            END LOOP;
            v_ahead := v_ahead + g.remaining;
            EXIT WHEN v_ahead >= v_draw;
        END LOOP;
        IF v_ahead < v_draw THEN
            RAISE EXCEPTION 'grants of % do not cover its balance', p_account_id
                USING ERRCODE = 'TA901';
        END IF;
    END IF;
    UPDATE accounts
    SET balance = v_balance,
        last_sequence = last_sequence + v_n,
        balance_updated_at = greatest(balance_updated_at, clock_timestamp())
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    -- The entries carry their callers already; the trigger then adds nothing.
    PERFORM set_config('tally.caller', '', true);
    WITH written AS (
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at, credit_type)
        SELECT p_account_id, a.last_sequence - v_n + n, 'debit', amount, balance_after,
               description, reference, metadata, request_id, a.balance_updated_at,
               credit_type
        FROM unnest(v_amounts, v_afters, v_descs, v_refs, v_metas, v_rids, v_types)
             WITH ORDINALITY AS t (amount, balance_after, description, reference,
                                   metadata, request_id, credit_type, n)
        RETURNING *
    )
    SELECT array_agg(jsonb_build_object('entry', to_jsonb(w)) ORDER BY w.sequence)
    INTO v_entries FROM written w;
    INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
    SELECT * FROM unnest(v_rids, v_methods, v_fps, v_entries);
    FOR v_j IN 1 .. v_n LOOP
        v_answers := v_answers || jsonb_build_object(
            v_pos[v_j], jsonb_build_object('replayed', false, 'response', v_entries[v_j]));
    END LOOP;
    PERFORM tally_maybe_reload(a, v_available_before);
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
    v_account text;
    v_run jsonb;
    v_set jsonb;
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
    -- Set-based first: the accounts with two or more calls, all debits, in a group of
    -- plain movements with distinct keys (so no call of the group can see another's key
    -- or account), each as one run (tally_debit_run; a lone debit is cheaper as itself).
    -- Every other call runs on its own below, in order.
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_calls) x
                   WHERE x->>'f' IS DISTINCT FROM 'tally_move')
       AND (SELECT count(DISTINCT x->'a'->>'request_id') = count(*)
            FROM jsonb_array_elements(p_calls) x) THEN
        FOR v_account, v_run IN
            SELECT x.value->'a'->>'account_id',
                   jsonb_agg(x.value || jsonb_build_object('i', x.ordinality)
                             ORDER BY x.ordinality)
            FROM jsonb_array_elements(p_calls) WITH ORDINALITY x
            GROUP BY 1
            HAVING count(*) > 1
               AND bool_and(x.value->'a'->>'type' = 'debit'
                            AND (x.value->'a'->>'amount')::bigint < 0)
            ORDER BY 1
        LOOP
            v_set := tally_debit_run(v_account, v_run);
            IF v_set IS NOT NULL THEN
                v_answers := v_answers || v_set;
            END IF;
        END LOOP;
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
