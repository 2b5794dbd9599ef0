-- Counts a finished event into its 15-minute bucket and the account's lifetime totals.
CREATE OR REPLACE FUNCTION tally_roll_up(e usage_events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS r (account_id, bucket_start, product_id, endpoint, requests,
                                    successful, failed, credits, quantity)
    VALUES (e.account_id,
            date_bin('15 minutes', e.started_at, timestamptz '2000-01-01 00:00:00+00'),
            e.product_id, e.endpoint, 1, CASE WHEN e.success THEN 1 ELSE 0 END,
            CASE WHEN e.success THEN 0 ELSE 1 END, e.credits, e.quantity)
    ON CONFLICT (account_id, bucket_start, product_id, endpoint) DO UPDATE
    SET requests = r.requests + 1,
        successful = r.successful + excluded.successful,
        failed = r.failed + excluded.failed,
        credits = r.credits + excluded.credits,
        quantity = r.quantity + excluded.quantity;
    UPDATE accounts
    SET usage_requests = usage_requests + 1,
        last_activity_at = greatest(last_activity_at, clock_timestamp())
    WHERE account_id = e.account_id;
END $$;

-- The charge of an event: the caller's stated credits, else the catalog price.
CREATE OR REPLACE FUNCTION tally_price(
    p products, p_quantity bigint, p_outcome text, p_stated bigint
) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_stated IS NOT NULL THEN
        RETURN p_stated;
    END IF;
    IF p_outcome = 'failed' AND NOT p.charge_failed THEN
        RETURN 0;
    END IF;
    RETURN greatest(p.credits_per_unit * p_quantity, p.minimum_charge);
END $$;

CREATE OR REPLACE FUNCTION tally_upsert_product(
    p_request_id text, p_fingerprint bytea, p_product_id text, p_display_name text,
    p_credits_per_unit bigint, p_charge_failed boolean, p_minimum_charge bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    p products;
    r jsonb;
BEGIN
    r := tally_replay(p_request_id, 'UpsertProduct', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    INSERT INTO products AS t (product_id, display_name, credits_per_unit, charge_failed,
                               minimum_charge)
    VALUES (p_product_id, p_display_name, p_credits_per_unit, p_charge_failed,
            p_minimum_charge)
    ON CONFLICT (product_id) DO UPDATE
    SET display_name = excluded.display_name,
        credits_per_unit = excluded.credits_per_unit,
        charge_failed = excluded.charge_failed,
        minimum_charge = excluded.minimum_charge,
        updated_at = clock_timestamp()
    RETURNING * INTO p;
    RETURN tally_remember(p_request_id, 'UpsertProduct', p_fingerprint,
                          jsonb_build_object('product', to_jsonb(p)));
END $$;

CREATE OR REPLACE FUNCTION tally_event_result(ev usage_events, p_duplicate boolean) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'event', to_jsonb(ev),
        'entry', (SELECT to_jsonb(l) FROM ledger_entries l WHERE l.entry_id = ev.entry_id),
        'duplicate', p_duplicate)
$$;

CREATE OR REPLACE FUNCTION tally_event_reused(p_account_id text, p_event_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event id reused' USING ERRCODE = 'TA419',
        DETAIL = json_build_object('account_id', p_account_id, 'event_id', p_event_id)::text;
END $$;

-- Records finished events (a batch of one or more) in one transaction. Each item
-- succeeds or fails alone without raising, so no subtransaction is needed; accounts
-- are locked in account_id order, so concurrent batches cannot deadlock.
CREATE OR REPLACE FUNCTION tally_record_usage(p_events jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    results jsonb[] := '{}';
    v_account text;
    a accounts;
    v_found boolean := false;
    ev usage_events;
    pr products;
    e ledger_entries;
    v_charge bigint;
    v_fingerprint bytea;
BEGIN
    FOR item IN
        SELECT value FROM jsonb_array_elements(p_events)
        ORDER BY value ->> 'account_id', (value ->> 'index')::int
    LOOP
        IF v_account IS DISTINCT FROM item ->> 'account_id' THEN
            v_account := item ->> 'account_id';
            PERFORM 1 FROM accounts WHERE account_id = v_account;
            v_found := FOUND;
            IF v_found THEN
                a := tally_lock_account(v_account);
            END IF;
        END IF;
        IF NOT v_found THEN
            results := results || jsonb_build_object(
                'index', item -> 'index', 'error', 'ACCOUNT_NOT_FOUND');
            CONTINUE;
        END IF;
        v_fingerprint := decode(item ->> 'fingerprint', 'hex');
        SELECT * INTO ev FROM usage_events
        WHERE account_id = v_account AND event_id = item ->> 'event_id';
        IF FOUND THEN
            IF ev.fingerprint = v_fingerprint THEN
                results := results || (jsonb_build_object('index', item -> 'index')
                                       || tally_event_result(ev, true));
            ELSE
                results := results || jsonb_build_object(
                    'index', item -> 'index', 'error', 'EVENT_ID_REUSED');
            END IF;
            CONTINUE;
        END IF;
        SELECT * INTO pr FROM products WHERE product_id = item ->> 'product_id';
        IF NOT FOUND THEN
            results := results || jsonb_build_object(
                'index', item -> 'index', 'error', 'PRODUCT_NOT_FOUND');
            CONTINUE;
        END IF;
        v_charge := tally_price(pr, (item ->> 'quantity')::bigint, item ->> 'status',
                                (item ->> 'credits')::bigint);
        IF v_charge > 0 AND a.balance - a.reserved - v_charge < -a.overdraft_limit THEN
            results := results || jsonb_build_object(
                'index', item -> 'index', 'error', 'INSUFFICIENT_CREDITS',
                'available', a.balance - a.reserved, 'requested', v_charge,
                'overdraft_limit', a.overdraft_limit);
            CONTINUE;
        END IF;
        e := NULL;
        IF v_charge > 0 THEN
            e := tally_post(
                v_account, 'debit', -v_charge, 0,
                'usage ' || pr.product_id || coalesce(' ' || nullif(item ->> 'endpoint', ''), ''),
                item ->> 'event_id',
                jsonb_build_object('event_id', item ->> 'event_id', 'product_id', pr.product_id),
                item ->> 'event_id', NULL);
            a.balance := e.balance_after;
        END IF;
        INSERT INTO usage_events (
            account_id, event_id, product_id, endpoint, status, success, status_code,
            message, quantity, credits, started_at, completed_at, processing_time_ms,
            request_metadata, result_metadata, webhook_url, entry_id, fingerprint,
            finish_fingerprint
        ) VALUES (
            v_account, item ->> 'event_id', pr.product_id, item ->> 'endpoint',
            item ->> 'status', (item ->> 'success')::boolean,
            (item ->> 'status_code')::integer, item ->> 'message',
            (item ->> 'quantity')::bigint, v_charge, (item ->> 'started_at')::timestamptz,
            (item ->> 'completed_at')::timestamptz, (item ->> 'processing_time_ms')::bigint,
            item -> 'request_metadata', item -> 'result_metadata', item ->> 'webhook_url',
            e.entry_id, v_fingerprint, v_fingerprint
        ) RETURNING * INTO ev;
        PERFORM tally_roll_up(ev);
        results := results || jsonb_build_object(
            'index', item -> 'index', 'event', to_jsonb(ev),
            'entry', CASE WHEN e.entry_id IS NULL THEN NULL ELSE to_jsonb(e) END,
            'duplicate', false);
    END LOOP;
    RETURN jsonb_build_object('replayed', false, 'response', to_jsonb(results));
END $$;

-- Starts a long job: a hold of the estimated charge and a PENDING/PROCESSING event.
CREATE OR REPLACE FUNCTION tally_start_usage(p_item jsonb, p_ttl_seconds bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    ev usage_events;
    pr products;
    h holds;
    v_estimate bigint;
    v_fingerprint bytea := decode(p_item ->> 'fingerprint', 'hex');
BEGIN
    a := tally_lock_account(p_item ->> 'account_id');
    SELECT * INTO ev FROM usage_events
    WHERE account_id = a.account_id AND event_id = p_item ->> 'event_id';
    IF FOUND THEN
        IF ev.fingerprint <> v_fingerprint THEN
            PERFORM tally_event_reused(a.account_id, ev.event_id);
        END IF;
        RETURN jsonb_build_object('replayed', true, 'response', jsonb_build_object(
            'event', to_jsonb(ev),
            'reservation', (SELECT to_jsonb(x) FROM holds x
                            WHERE x.reservation_id = ev.reservation_id)));
    END IF;
    SELECT * INTO pr FROM products WHERE product_id = p_item ->> 'product_id';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'product not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'product',
                                       'id', p_item ->> 'product_id')::text;
    END IF;
    v_estimate := tally_price(pr, (p_item ->> 'quantity')::bigint, 'completed',
                              (p_item ->> 'credits')::bigint);
    IF v_estimate > 0 THEN
        h := tally_place_hold(a, v_estimate, p_ttl_seconds, p_item ->> 'event_id',
                              jsonb_build_object('event_id', p_item ->> 'event_id',
                                                 'product_id', pr.product_id),
                              p_item ->> 'event_id');
    END IF;
    INSERT INTO usage_events (
        account_id, event_id, product_id, endpoint, status, success, status_code, message,
        quantity, started_at, request_metadata, webhook_url, reservation_id, fingerprint
    ) VALUES (
        a.account_id, p_item ->> 'event_id', pr.product_id, p_item ->> 'endpoint',
        p_item ->> 'status', false, (p_item ->> 'status_code')::integer,
        p_item ->> 'message', (p_item ->> 'quantity')::bigint,
        (p_item ->> 'started_at')::timestamptz, p_item -> 'request_metadata',
        p_item ->> 'webhook_url', h.reservation_id, v_fingerprint
    ) RETURNING * INTO ev;
    UPDATE accounts SET last_activity_at = clock_timestamp() WHERE account_id = a.account_id;
    RETURN jsonb_build_object('replayed', false, 'response', jsonb_build_object(
        'event', to_jsonb(ev),
        'reservation', CASE WHEN h.reservation_id IS NULL THEN NULL ELSE to_jsonb(h) END));
END $$;

-- Completes or fails a started job: captures the actual charge from its hold (the rest
-- is released) or releases it, and finishes the event, in one transaction.
CREATE OR REPLACE FUNCTION tally_finish_usage(p_item jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    ev usage_events;
    pr products;
    h holds;
    e ledger_entries;
    v_outcome text := p_item ->> 'status';
    v_quantity bigint;
    v_charge bigint;
    v_completed_at timestamptz;
    v_fingerprint bytea := decode(p_item ->> 'fingerprint', 'hex');
BEGIN
    a := tally_lock_account(p_item ->> 'account_id');
    SELECT * INTO ev FROM usage_events
    WHERE account_id = a.account_id AND event_id = p_item ->> 'event_id';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'event', 'id', p_item ->> 'event_id')::text;
    END IF;
    IF ev.status IN ('completed', 'failed') THEN
        IF ev.finish_fingerprint = v_fingerprint THEN
            RETURN jsonb_build_object('replayed', true,
                                      'response', tally_event_result(ev, true));
        END IF;
        RAISE EXCEPTION 'event not pending' USING ERRCODE = 'TA413',
            DETAIL = json_build_object('event_id', ev.event_id, 'status', ev.status,
                                       'message', ev.message)::text;
    END IF;
    SELECT * INTO pr FROM products WHERE product_id = ev.product_id;
    v_quantity := coalesce((p_item ->> 'quantity')::bigint, ev.quantity);
    v_charge := tally_price(pr, v_quantity, v_outcome, (p_item ->> 'credits')::bigint);
    IF ev.reservation_id IS NOT NULL THEN
        SELECT * INTO h FROM holds WHERE reservation_id = ev.reservation_id;
    END IF;
    IF v_charge > coalesce(h.amount, 0) THEN
        RAISE EXCEPTION 'capture exceeds hold' USING ERRCODE = 'TA422',
            DETAIL = json_build_object('held', coalesce(h.amount, 0),
                                       'requested', v_charge)::text;
    END IF;
    IF h.reservation_id IS NOT NULL AND v_charge > 0 THEN
        UPDATE holds SET status = 'captured', captured = v_charge,
                         finalized_at = clock_timestamp()
        WHERE reservation_id = h.reservation_id;
        e := tally_post(a.account_id, 'debit', -v_charge, -h.amount,
                        'usage ' || pr.product_id || coalesce(' ' || nullif(ev.endpoint, ''), ''),
                        ev.event_id,
                        jsonb_build_object('event_id', ev.event_id, 'product_id', pr.product_id),
                        ev.event_id, h.reservation_id);
    ELSIF h.reservation_id IS NOT NULL THEN
        UPDATE holds SET status = 'released', finalized_at = clock_timestamp()
        WHERE reservation_id = h.reservation_id;
        UPDATE accounts SET reserved = reserved - h.amount, balance_updated_at = clock_timestamp()
        WHERE account_id = a.account_id;
        PERFORM tally_settle_expired(a.account_id, clock_timestamp());
    END IF;
    v_completed_at := coalesce((p_item ->> 'completed_at')::timestamptz, clock_timestamp());
    UPDATE usage_events SET
        status = v_outcome,
        success = (p_item ->> 'success')::boolean,
        status_code = (p_item ->> 'status_code')::integer,
        message = p_item ->> 'message',
        quantity = v_quantity,
        credits = v_charge,
        completed_at = v_completed_at,
        processing_time_ms = coalesce(
            (p_item ->> 'processing_time_ms')::bigint,
            greatest(0, floor(extract(epoch FROM v_completed_at - ev.started_at) * 1000))::bigint),
        result_metadata = p_item -> 'result_metadata',
        entry_id = e.entry_id,
        finish_fingerprint = v_fingerprint
    WHERE account_id = ev.account_id AND event_id = ev.event_id
    RETURNING * INTO ev;
    PERFORM tally_roll_up(ev);
    RETURN jsonb_build_object('replayed', false, 'response', tally_event_result(ev, false));
END $$;
