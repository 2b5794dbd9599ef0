-- The one draw of a run's entries (tally_debit_run, tally_hold_run): entry j of
-- p_accounts[j] draws p_shares[j] from that account's grants, each account's entries in
-- order (its draw as one, by tally_draw). Returns each entry's credit type in order:
-- the type of the grant holding the first credit of its own share (NULL for a share of
-- 0), as a lone movement's entry gets its own.
CREATE OR REPLACE FUNCTION tally_draw_entries(p_accounts text[], p_shares bigint[])
RETURNS text[] LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids text[];
    v_draws bigint[];
    v_d_accounts text[];
    v_d_aheads bigint[];
    v_d_remainings bigint[];
    v_d_types text[];
    v_types text[];
BEGIN
    SELECT array_agg(s.account_id), array_agg(s.draw) INTO v_ids, v_draws
    FROM (SELECT account_id, sum(share)::bigint AS draw
          FROM unnest(p_accounts, p_shares) AS u (account_id, share)
          GROUP BY account_id HAVING sum(share) > 0) s;
    IF v_ids IS NOT NULL THEN
        SELECT array_agg(d.account_id), array_agg(d.ahead), array_agg(d.remaining),
               array_agg(d.grant_type)
        INTO v_d_accounts, v_d_aheads, v_d_remainings, v_d_types
        FROM tally_draw(v_ids, v_draws) d;
    END IF;
    WITH drawn AS (
        SELECT * FROM unnest(v_d_accounts, v_d_aheads, v_d_remainings, v_d_types)
                      AS d (account_id, ahead, remaining, grant_type)
    ), entries AS (
        SELECT e.n, e.account_id, e.share,
               coalesce(sum(e.share) OVER (PARTITION BY e.account_id ORDER BY e.n
                                           ROWS BETWEEN UNBOUNDED PRECEDING
                                                    AND 1 PRECEDING), 0) AS offset_
        FROM unnest(p_accounts, p_shares) WITH ORDINALITY AS e (account_id, share, n)
    )
    SELECT array_agg((SELECT d.grant_type FROM drawn d
                      WHERE e.share > 0 AND d.account_id = e.account_id
                        AND d.ahead <= e.offset_ AND e.offset_ < d.ahead + d.remaining)
                     ORDER BY e.n)
    INTO v_types FROM entries e;
    RETURN v_types;
END $$;

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
-- handle gets no answer and nothing written, and its calls run one by one: none, or
-- alerts on available credit (whose crossings are per movement) with two calls or more
-- in the group. With one call, the run's one update of the account is that movement's
-- own (the alerts' trigger sees the same before and after).
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
    v_single text[];
    v_account text;
    v_rid text;
    v_known text[];
    v_answers jsonb := '{}';
    v_now timestamptz;
    v_amount bigint;
    -- Per account handled, in account_id order.
    v_available_before bigint[] := '{}';
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
    v_shares bigint[] := '{}';
    v_types text[];
    v_entries jsonb[];
    v_mark text;
BEGIN
    SELECT array_agg(s.acct), array_agg(s.acct) FILTER (WHERE s.n = 1) INTO v_ids, v_single
    FROM (SELECT y->'a'->>'account_id' AS acct, count(*) AS n
          FROM jsonb_array_elements(p_calls) y GROUP BY 1) s;
    -- The catch-up, only where something is due (as tally_find_account would do at the
    -- start of the account's first call alone, stamped with that call's caller). The
    -- same opening as tally_hold_run's, kept inline in both: as a shared function it
    -- cost 2-6 µs more per grouped hot debit (bench.move_cost, stop 19).
    v_now := clock_timestamp();
    FOR v_account IN SELECT d FROM tally_due_accounts(v_ids, v_now) d ORDER BY d LOOP
        PERFORM set_config('tally.caller', coalesce((
            SELECT y->>'caller' FROM jsonb_array_elements(p_calls) y
            WHERE y->'a'->>'account_id' = v_account LIMIT 1), ''), true);
        PERFORM tally_find_account(v_account);
    END LOOP;
    SELECT array_agg(t ORDER BY t.account_id COLLATE "C") INTO v_rows FROM accounts t
    WHERE t.account_id = ANY (v_ids)
      AND (NOT t.available_alerts OR t.account_id = ANY (v_single));
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
        v_shares := v_shares || least(-v_amount, greatest(a.balance, 0));
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
    -- The entries carry their callers already; the trigger then adds nothing.
    PERFORM set_config('tally.caller', '', true);
    v_types := tally_draw_entries(v_accts, v_shares);
    -- Every entry's account is a locked row of v_rows: ledger_entries_account (migration
    -- 0017) need not look.
    v_mark := set_config('tally.references_checked', 'on', true);
    WITH written AS (
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at, credit_type)
        SELECT * FROM unnest(v_accts, v_seqs, array_fill('debit'::text, ARRAY[v_n]),
                             v_amounts, v_afters, v_descs, v_refs, v_metas, v_rids, v_ats,
                             v_types)
        RETURNING *
    )
    SELECT array_agg(jsonb_build_object('entry', to_jsonb(w))
                     ORDER BY w.account_id COLLATE "C", w.sequence)
    INTO v_entries FROM written w;
    v_mark := set_config('tally.references_checked', '', true);
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

-- The Reserves, Captures and Releases of a group, applied as a set (issue 8), over every
-- account whose calls in the group are all of them, as tally_debit_run does for debits:
-- what the calls would do one after another, with each account row updated once, the
-- grants of every account drawn once for the captures, and the new holds, the finished
-- holds, the entries and the keys of every account each written by one statement. Each
-- call keeps exactly its own outcome, in order: replays and refused keys are answered
-- from the stored key; a Reserve is held to the balance rule over its account's running
-- balance and reserved credit; a Capture or Release of a hold that an earlier call of
-- the run finished is refused as it would be then (no longer pending). Every new hold,
-- every finished hold and every entry of an account carries the one instant of that
-- account's update (a hold expires its TTL after it), as the entries of a debit run do;
-- everything due by that instant was caught up first.
-- p_calls: [{"i": position in the group, "acct": the call's account (a Capture's or a
-- Release's is its hold's), "caller": name, "f": function, "a": arguments}], request ids
-- distinct in the group, each account's calls in group order. Every account is already
-- locked by the caller (tally_apply_group). Returns the answers by position of the calls
-- it handled; an account it does not handle gets no answer and nothing written, and its
-- calls run one by one: none; alerts on available credit or auto-reload on, with two
-- calls or more in the group (decided per movement; a run of holds can cross a
-- threshold more than once; with one call, the run's one update of the account and its
-- one reload check are exactly the movement's); expired credit kept under holds (whose
-- write-off a capture or release may have to do).
CREATE OR REPLACE FUNCTION tally_hold_run(p_calls jsonb) RETURNS jsonb
LANGUAGE plpgsql
-- Plans made once per session and kept, as tally_debit_run's; every statement probes
-- accounts, holds and keys by index whatever the size of its arrays.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c jsonb;
    x jsonb;
    a accounts;
    h holds;
    v_rows accounts[];
    v_k integer := 0;
    v_ids text[];
    v_single text[];
    v_account text;
    v_f text;
    v_rid text;
    v_known text[];
    v_answers jsonb := '{}';
    v_now timestamptz;
    v_stamp timestamptz;
    v_amount bigint;
    v_refusal jsonb;
    v_hk integer;
    -- Per account handled, in account_id order: its instant, its available credit
    -- before the run, its calls applied.
    v_stamps timestamptz[] := '{}';
    v_available_before bigint[] := '{}';
    v_counts integer[] := '{}';
    -- The holds the run's Captures and Releases name, and their state as the run goes.
    v_hids uuid[];
    v_hstatus text[];
    v_hrows holds[];
    v_open uuid[];
    -- Per call that applies, in order: position, kind, key, and what it writes.
    v_n integer := 0;
    v_pos text[] := '{}';
    v_kinds text[] := '{}';
    v_rids text[] := '{}';
    v_methods text[] := '{}';
    v_fps bytea[] := '{}';
    v_slot integer[] := '{}';      -- the index of its new or finished hold
    v_res_ids uuid[] := '{}';      -- new holds (Reserves)
    v_res_accts text[] := '{}';
    v_res_amounts bigint[] := '{}';
    v_res_ttls bigint[] := '{}';
    v_res_refs text[] := '{}';
    v_res_metas jsonb[] := '{}';
    v_res_rids text[] := '{}';
    v_res_ats timestamptz[] := '{}';
    v_fin_ids uuid[] := '{}';      -- finished holds (Captures, Releases)
    v_fin_status text[] := '{}';
    v_fin_captured bigint[] := '{}';
    v_fin_ats timestamptz[] := '{}';
    v_e integer := 0;              -- entries (Captures), in order
    v_e_accts text[] := '{}';
    v_e_seqs bigint[] := '{}';
    v_e_amounts bigint[] := '{}';
    v_e_afters bigint[] := '{}';
    v_e_descs text[] := '{}';
    v_e_refs text[] := '{}';
    v_e_metas jsonb[] := '{}';
    v_e_rids text[] := '{}';
    v_e_res uuid[] := '{}';
    v_e_ats timestamptz[] := '{}';
    v_e_shares bigint[] := '{}';
    v_e_types text[];
    v_new holds[];
    v_done holds[];
    v_entries ledger_entries[];
    v_responses jsonb[] := '{}';
    v_j integer;
    v_mark text;
BEGIN
    SELECT array_agg(s.acct), array_agg(s.acct) FILTER (WHERE s.n = 1) INTO v_ids, v_single
    FROM (SELECT y->>'acct' AS acct, count(*) AS n
          FROM jsonb_array_elements(p_calls) y GROUP BY 1) s;
    -- The catch-up, only where something is due (as tally_find_account would do at the
    -- start of the account's first call alone, stamped with that call's caller; the
    -- same opening as tally_debit_run's, see there). The run's instant is not before
    -- this check, so nothing due by it is left undone.
    v_now := clock_timestamp();
    FOR v_account IN SELECT d FROM tally_due_accounts(v_ids, v_now) d ORDER BY d LOOP
        PERFORM set_config('tally.caller', coalesce((
            SELECT y->>'caller' FROM jsonb_array_elements(p_calls) y
            WHERE y->>'acct' = v_account LIMIT 1), ''), true);
        PERFORM tally_find_account(v_account);
    END LOOP;
    SELECT array_agg(t ORDER BY t.account_id COLLATE "C") INTO v_rows FROM accounts t
    WHERE t.account_id = ANY (v_ids)
      AND ((NOT t.available_alerts AND NOT t.auto_reload_enabled)
           OR t.account_id = ANY (v_single))
      -- A subquery, not NOT EXISTS: an anti join's generic plan scanned all of grants.
      AND NOT coalesce((SELECT true FROM grants g
                        WHERE g.account_id = t.account_id AND NOT g.spent AND g.expired
                        LIMIT 1), false);
    IF v_rows IS NULL THEN
        RETURN v_answers;
    END IF;
    SELECT array_agg(request_id) INTO v_known FROM idempotency_keys
    WHERE request_id = ANY (ARRAY(SELECT y->'a'->>'request_id'
                                  FROM jsonb_array_elements(p_calls) y));
    -- The holds named, read under their accounts' locks (every change of a hold is made
    -- under it), and those still the reservation of an open usage job. Planned afresh
    -- each time (EXECUTE), as the UPDATE of the holds finished below: a plan kept for the
    -- session, made while holds was small, reads the whole table, in time linear in the
    -- table's history until an ANALYZE of holds.
    EXECUTE 'SELECT array_agg(h2.reservation_id), array_agg(h2.status), array_agg(h2)
             FROM holds h2 WHERE h2.reservation_id = ANY ($1)'
    INTO v_hids, v_hstatus, v_hrows
    USING ARRAY(SELECT (y->'a'->>'reservation_id')::uuid
                FROM jsonb_array_elements(p_calls) y
                WHERE y->'a' ? 'reservation_id');
    SELECT array_agg(DISTINCT u.reservation_id) INTO v_open FROM usage_events u
    WHERE u.reservation_id = ANY (v_hids) AND u.status IN ('pending', 'processing');
    -- The calls by account (in account_id order), each account's in group order.
    FOR c IN SELECT y.value FROM jsonb_array_elements(p_calls) WITH ORDINALITY y
             ORDER BY (y.value->>'acct') COLLATE "C", y.ordinality LOOP
        IF v_k = 0 OR v_rows[v_k].account_id IS DISTINCT FROM c->>'acct' THEN
            -- The next account handled, if this call's account is one.
            IF v_k < cardinality(v_rows) AND v_rows[v_k + 1].account_id = c->>'acct' THEN
                v_k := v_k + 1;
                a := v_rows[v_k];
                v_stamps := v_stamps || greatest(a.balance_updated_at, v_now);
                v_available_before := v_available_before || (a.balance - a.reserved);
                v_counts := v_counts || 0;
            ELSE
                CONTINUE;
            END IF;
        END IF;
        x := c->'a';
        v_f := c->>'f';
        v_rid := x->>'request_id';
        v_stamp := v_stamps[v_k];
        IF v_f = 'tally_reserve' THEN
            IF v_rid = ANY (v_known) THEN
                v_answers := v_answers || jsonb_build_object(c->>'i', tally_replay(
                    v_rid, 'Reserve', decode(x->>'fingerprint', 'hex')));
                CONTINUE;
            END IF;
            v_amount := (x->>'amount')::bigint;
            IF NOT tally_fits(a, v_amount) THEN
                v_answers := v_answers || jsonb_build_object(c->>'i',
                                                             tally_insufficient(a, v_amount));
                CONTINUE;
            END IF;
            a.reserved := a.reserved + v_amount;
            v_res_ids := v_res_ids || gen_random_uuid();
            v_res_accts := v_res_accts || a.account_id;
            v_res_amounts := v_res_amounts || v_amount;
            v_res_ttls := v_res_ttls || (x->>'ttl_seconds')::bigint;
            v_res_refs := v_res_refs || (x->>'reference');
            v_res_metas := v_res_metas || (x->>'metadata')::jsonb;
            v_res_rids := v_res_rids || v_rid;
            v_res_ats := v_res_ats || v_stamp;
            v_slot := v_slot || cardinality(v_res_ids);
            v_methods := v_methods || 'Reserve'::text;
        ELSE
            v_hk := array_position(v_hids, (x->>'reservation_id')::uuid);
            IF v_hk IS NULL OR v_hrows[v_hk].account_id <> a.account_id THEN
                -- Not a hold of this account: the dispatch never sends one.
                RAISE EXCEPTION 'hold % is not of %', x->>'reservation_id', a.account_id
                    USING ERRCODE = 'TA999';
            END IF;
            h := v_hrows[v_hk];
            h.status := v_hstatus[v_hk];
            v_refusal := CASE WHEN v_rid = ANY (v_known) THEN tally_replay(
                v_rid, CASE v_f WHEN 'tally_capture' THEN 'Capture' ELSE 'Release' END,
                decode(x->>'fingerprint', 'hex')) END;
            IF v_refusal IS NULL AND h.reservation_id = ANY (v_open) THEN
                v_refusal := tally_refuse_usage_hold(h);
            END IF;
            v_refusal := coalesce(v_refusal, tally_require_pending(h));
            IF v_refusal IS NULL AND v_f = 'tally_capture' THEN
                v_amount := coalesce((x->>'amount')::bigint, h.amount);
                IF v_amount > h.amount THEN
                    v_refusal := tally_refusal('TA422', json_build_object(
                        'held', h.amount, 'requested', v_amount));
                END IF;
            END IF;
            IF v_refusal IS NOT NULL THEN
                v_answers := v_answers || jsonb_build_object(c->>'i', v_refusal);
                CONTINUE;
            END IF;
            v_fin_ids := v_fin_ids || h.reservation_id;
            v_fin_ats := v_fin_ats || v_stamp;
            v_slot := v_slot || cardinality(v_fin_ids);
            -- The whole hold leaves reserved; only the captured part leaves the balance.
            a.reserved := a.reserved - h.amount;
            IF v_f = 'tally_capture' THEN
                v_hstatus[v_hk] := 'captured';
                v_fin_status := v_fin_status || 'captured'::text;
                v_fin_captured := v_fin_captured || v_amount;
                v_e_shares := v_e_shares || least(v_amount, greatest(a.balance, 0));
                a.balance := a.balance - v_amount;
                a.last_sequence := a.last_sequence + 1;
                v_e := v_e + 1;
                v_e_accts := v_e_accts || a.account_id;
                v_e_seqs := v_e_seqs || a.last_sequence;
                v_e_amounts := v_e_amounts || -v_amount;
                v_e_afters := v_e_afters || a.balance;
                v_e_descs := v_e_descs || (x->>'description');
                v_e_refs := v_e_refs || h.reference;
                v_e_metas := v_e_metas || CASE WHEN coalesce(c->>'caller', '') <> ''
                    THEN h.metadata || (x->>'metadata')::jsonb
                         || jsonb_build_object('caller', c->>'caller')
                    ELSE h.metadata || (x->>'metadata')::jsonb END;
                v_e_rids := v_e_rids || v_rid;
                v_e_res := v_e_res || h.reservation_id;
                v_e_ats := v_e_ats || v_stamp;
                v_methods := v_methods || 'Capture'::text;
            ELSE
                v_hstatus[v_hk] := 'released';
                v_fin_status := v_fin_status || 'released'::text;
                v_fin_captured := v_fin_captured || 0::bigint;
                v_methods := v_methods || 'Release'::text;
            END IF;
        END IF;
        v_rows[v_k] := a;
        v_counts[v_k] := v_counts[v_k] + 1;
        v_n := v_n + 1;
        v_pos := v_pos || (c->>'i');
        v_kinds := v_kinds || v_f;
        v_rids := v_rids || v_rid;
        v_fps := v_fps || decode(x->>'fingerprint', 'hex');
    END LOOP;
    IF v_n = 0 THEN
        RETURN v_answers;
    END IF;
    IF cardinality(v_res_ids) > 0 THEN
        WITH placed AS (
            INSERT INTO holds (reservation_id, account_id, status, amount, expires_at,
                               reference, metadata, request_id, created_at)
            SELECT id, account_id, 'pending', amount, at + make_interval(secs => ttl),
                   reference, metadata, request_id, at
            FROM unnest(v_res_ids, v_res_accts, v_res_amounts, v_res_ttls, v_res_refs,
                        v_res_metas, v_res_rids, v_res_ats)
                 AS t (id, account_id, amount, ttl, reference, metadata, request_id, at)
            RETURNING *
        )
        SELECT array_agg(p ORDER BY array_position(v_res_ids, p.reservation_id))
        INTO v_new FROM placed p;
    END IF;
    IF cardinality(v_fin_ids) > 0 THEN
        EXECUTE 'WITH finished AS (
            UPDATE holds h2 SET status = t.status, captured = t.captured,
                                finalized_at = t.at
            FROM unnest($1, $2, $3, $4) AS t (id, status, captured, at)
            WHERE h2.reservation_id = t.id
            RETURNING h2
        )
        SELECT array_agg(f.h2 ORDER BY array_position($1, (f.h2).reservation_id))
        FROM finished f'
        INTO v_done USING v_fin_ids, v_fin_status, v_fin_captured, v_fin_ats;
    END IF;
    IF v_e > 0 THEN
        v_e_types := tally_draw_entries(v_e_accts, v_e_shares);
    END IF;
    -- The accounts, once each: the running state the loop left in v_rows.
    UPDATE accounts t
    SET balance = (v_rows[k]).balance, reserved = (v_rows[k]).reserved,
        last_sequence = (v_rows[k]).last_sequence, balance_updated_at = v_stamps[k]
    FROM generate_subscripts(v_rows, 1) k
    WHERE t.account_id = ANY (v_ids)  -- by the key's index, whatever the planner guesses
      AND t.account_id = (v_rows[k]).account_id AND v_counts[k] > 0;
    -- The reload rule, for an account with auto-reload on (one call: see above), on its
    -- available credit before and after, as the movement alone checks it.
    FOR v_k IN 1 .. cardinality(v_rows) LOOP
        IF v_rows[v_k].auto_reload_enabled AND v_counts[v_k] > 0 THEN
            PERFORM tally_maybe_reload(v_rows[v_k], v_available_before[v_k]);
        END IF;
    END LOOP;
    IF v_e > 0 THEN
        -- The entries carry their callers already; the trigger then adds nothing.
        PERFORM set_config('tally.caller', '', true);
        -- Every entry's account is locked (by tally_apply_group, and updated just
        -- above): ledger_entries_account (migration 0017) need not look.
        v_mark := set_config('tally.references_checked', 'on', true);
        WITH written AS (
            INSERT INTO ledger_entries (
                account_id, sequence, entry_type, amount, balance_after, description,
                reference, metadata, request_id, reservation_id, created_at, credit_type)
            SELECT * FROM unnest(v_e_accts, v_e_seqs, array_fill('debit'::text, ARRAY[v_e]),
                                 v_e_amounts, v_e_afters, v_e_descs, v_e_refs, v_e_metas,
                                 v_e_rids, v_e_res, v_e_ats, v_e_types)
            RETURNING *
        )
        SELECT array_agg(w ORDER BY w.account_id COLLATE "C", w.sequence)
        INTO v_entries FROM written w;
        v_mark := set_config('tally.references_checked', '', true);
    END IF;
    -- The answers, in the loop's order (the entries' order too).
    v_e := 0;
    FOR v_j IN 1 .. v_n LOOP
        IF v_kinds[v_j] = 'tally_reserve' THEN
            v_responses := v_responses
                || jsonb_build_object('reservation', to_jsonb(v_new[v_slot[v_j]]));
        ELSIF v_kinds[v_j] = 'tally_capture' THEN
            v_e := v_e + 1;
            v_responses := v_responses
                || jsonb_build_object('reservation', to_jsonb(v_done[v_slot[v_j]]),
                                      'entry', to_jsonb(v_entries[v_e]));
        ELSE
            v_responses := v_responses
                || jsonb_build_object('reservation', to_jsonb(v_done[v_slot[v_j]]));
        END IF;
    END LOOP;
    INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
    SELECT * FROM unnest(v_rids, v_methods, v_fps, v_responses);
    SELECT v_answers || jsonb_object_agg(
               t.pos, jsonb_build_object('replayed', false, 'response', t.response))
    INTO v_answers FROM unnest(v_pos, v_responses) AS t (pos, response);
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
-- (of this or another process) never wait on each other in a cycle. An account's debits,
-- or its Reserves, Captures and Releases, are then applied as a set where they can be
-- (tally_debit_run, tally_hold_run: same outcomes), and the other calls run one after
-- another, each exactly as it would alone. A refusal is returned before its
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
    v_accounts text[];
    v_debits jsonb;
    v_holds jsonb;
    v_answers jsonb := '{}';
    v_results jsonb[] := '{}';
BEGIN
    -- Each call's account: its own, or its hold's (NULL when there is none).
    SELECT array_agg(CASE WHEN x.value->'a' ? 'reservation_id'
                          THEN (SELECT h.account_id FROM holds h
                                WHERE h.reservation_id
                                      = (x.value->'a'->>'reservation_id')::uuid)
                          ELSE x.value->'a'->>'account_id' END ORDER BY x.ordinality)
    INTO v_accounts
    FROM jsonb_array_elements(p_calls) WITH ORDINALITY x;
    PERFORM 1 FROM accounts WHERE account_id = ANY (v_accounts)
    ORDER BY account_id FOR UPDATE;
    -- Set-based first, in a group of movements with distinct keys (so no call of the
    -- group can see another's key or account): the calls of every account whose calls
    -- are all debits, as one run (tally_debit_run; a lone debit alone in its group is
    -- cheaper as itself), and the calls of every account whose calls are all Reserves,
    -- Captures and Releases of its holds, as one run (tally_hold_run; likewise). Every
    -- other call runs on its own below, in order.
    IF (SELECT count(DISTINCT x->'a'->>'request_id') = count(*)
        FROM jsonb_array_elements(p_calls) x) THEN
        -- Both runs' calls by one pass over the group (each call with its position and
        -- its account).
        SELECT jsonb_agg(y.c ORDER BY y.i) FILTER (WHERE y.debits),
               jsonb_agg(y.c ORDER BY y.i) FILTER (WHERE y.holds AND y.account_id IS NOT NULL)
        INTO v_debits, v_holds
        FROM (SELECT x.value || jsonb_build_object('i', x.ordinality,
                                                   'acct', v_accounts[x.ordinality]) AS c,
                     x.ordinality AS i, v_accounts[x.ordinality] AS account_id,
                     bool_and(x.value->>'f' = 'tally_move'
                              AND x.value->'a'->>'type' = 'debit'
                              AND (x.value->'a'->>'amount')::bigint < 0) OVER w AS debits,
                     bool_and(x.value->>'f' IN ('tally_reserve', 'tally_capture',
                                                'tally_release')) OVER w AS holds
              FROM jsonb_array_elements(p_calls) WITH ORDINALITY x
              WINDOW w AS (PARTITION BY v_accounts[x.ordinality])) y;
        IF jsonb_array_length(v_debits) > 1 THEN
            v_answers := tally_debit_run(v_debits);
        END IF;
        IF jsonb_array_length(v_holds) > 1 THEN
            v_answers := v_answers || tally_hold_run(v_holds);
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
