-- Group commit: several callers' movements, gathered by one server process, applied by
-- one call in one transaction (one WAL flush, each account's lock taken once).
--
-- p_calls is a JSON array of {"f": function, "caller": name, "a": {arguments}}; the
-- arguments are the named parameters of the function without their `p_` prefix
-- (fingerprints as hex, metadata and grants as JSON text). The answer is an array of
-- the same length: {"ok": response} or {"error": {"sqlstate", "detail", "message"}}.
--
-- Every account the group touches is locked first, in account_id order, so two groups
-- (of this or another process) never wait on each other in a cycle. Each call then
-- runs as it would alone, in a subtransaction: a refused call (insufficient credit,
-- a reused key, an unknown account…) rolls back only its own writes and answers its
-- own error; its neighbours are unaffected. Errors a subtransaction cannot catch (the
-- statement timeout, a lost connection) fail the whole group, and nothing of it is
-- written; the server answers each caller UNAVAILABLE, and retries are safe by key.
CREATE OR REPLACE FUNCTION tally_apply_group(p_calls jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    a jsonb;
    r jsonb;
    v_results jsonb[] := '{}';
    v_state text;
    v_detail text;
    v_message text;
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
    FOR c IN SELECT value FROM jsonb_array_elements(p_calls) LOOP
        a := c->'a';
        BEGIN
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
            v_results := v_results || jsonb_build_object('ok', r);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE,
                v_detail = PG_EXCEPTION_DETAIL, v_message = MESSAGE_TEXT;
            v_results := v_results || jsonb_build_object('error', jsonb_build_object(
                'sqlstate', v_state, 'detail', v_detail, 'message', v_message));
        END;
    END LOOP;
    RETURN to_jsonb(v_results);
END $$;
