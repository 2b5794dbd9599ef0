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

-- The charge of an event: the caller's stated credits, else the catalog price. One SQL
-- expression, so a query that prices many events inlines it.
CREATE OR REPLACE FUNCTION tally_price(
    p products, p_quantity bigint, p_outcome text, p_stated bigint
) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_stated IS NOT NULL THEN p_stated
        WHEN p_outcome = 'failed' AND NOT p.charge_failed THEN 0
        ELSE greatest(p.credits_per_unit * p_quantity, p.minimum_charge)
    END
$$;

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

-- Records finished events (a batch, a stream's group, or one event) in one transaction,
-- with set operations: the events are expanded from the JSON once and priced by one join
-- with the catalog; the accounts are locked once each, in account_id order (so
-- concurrent groups cannot deadlock); duplicates are found by one join on
-- (account_id, event_id); and each table is written once: one INSERT of the ledger
-- entries (one per charged event, numbered and chained per account), one of the events,
-- one upsert of pre-aggregated rollups, one UPDATE of the accounts; grants are drawn once
-- per account for its total, and auto-reload is decided once per account.
--
-- Each item succeeds or fails alone and nothing raises for a refusal; the answer is one
-- result per item (in any order), keyed by its "index":
--   {"error": "ACCOUNT_NOT_FOUND" | "PRODUCT_NOT_FOUND" | "EVENT_ID_REUSED"}
--   {"error": "INSUFFICIENT_CREDITS", "available", "requested", "overdraft_limit"}
--   {"event": row, "entry": row | null, "duplicate": true}: recorded by an earlier call
--   {"written": true, "of": index, "duplicate": bool, "event": {...}, "entry": {...} | null}:
--     written by this call (by the item "of", whose duplicate this one is when they
--     differ); "event" and "entry" hold only what the database decided (the charge,
--     credit type, times, ids, balance), the rest is the item "of" as sent.
--
-- The balance rule, per account, in index order: an event is refused when its charge
-- is positive and does not fit in the available credit left by the events accepted
-- before it (available - charge < -overdraft_limit); a later, smaller one may still fit.
-- When the account's whole group fits (the usual case) every event is accepted at once;
-- otherwise one pass over its events decides them in order. Within a group the first
-- accepted occurrence of an event id wins: later ones with the same payload are its
-- duplicates, with another payload EVENT_ID_REUSED; an occurrence refused before it
-- (unknown product, no credit) does not count, as if the items had come one by one.
CREATE OR REPLACE FUNCTION tally_record_usage(p_events jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_items tally_usage_item[];
    v_locked text[];
    v_account text;
    v_outcome text[];
    v_winner integer[];
    v_available bigint[];
    v_fingerprints bytea[];
    v_left bigint;
    v_won integer;
    v_slow record;
    v_row accounts;
    v_results jsonb;
    v_charged_accounts text[];
    v_charged bigint[];
    v_before bigint[];
    v_now timestamptz := clock_timestamp();
BEGIN
    -- The events, priced, in (account_id, index) order: pos is the array subscript.
    SELECT array_agg(ROW(
               x.pos, x.index, x.account_id, x.event_id, x.product_id, x.endpoint, x.status,
               x.success, x.status_code, x.message, x.quantity,
               CASE WHEN p.product_id IS NOT NULL
                    THEN tally_price(p, x.quantity, x.status, x.credits) END,
               x.started_at, x.completed_at, x.processing_time_ms, x.request_metadata,
               x.result_metadata, x.webhook_url, decode(x.fingerprint, 'hex')
           )::tally_usage_item ORDER BY x.pos)
    INTO v_items
    FROM (SELECT e.*, row_number() OVER (ORDER BY e.account_id, e.index) AS pos
          FROM jsonb_to_recordset(p_events) AS e(
              index integer, account_id text, event_id text, product_id text, endpoint text,
              status text, success boolean, status_code integer, message text,
              quantity bigint, credits bigint, started_at timestamptz,
              completed_at timestamptz, processing_time_ms bigint, request_metadata jsonb,
              result_metadata jsonb, webhook_url text, fingerprint text)) x
    LEFT JOIN products p ON p.product_id = x.product_id;
    IF v_items IS NULL THEN
        RETURN jsonb_build_object('replayed', false, 'response', '[]'::jsonb);
    END IF;

    -- Lock every account of the group once, in account_id order; then catch up (as
    -- tally_lock_account does) on those with something due: the same test as
    -- tally_balance (a renewal, a pending hold or a live grant past its instant).
    SELECT array_agg(l.account_id) INTO v_locked
    FROM (SELECT account_id FROM accounts
          WHERE account_id IN (SELECT i.account_id FROM unnest(v_items) i)
          ORDER BY account_id FOR UPDATE) l;
    FOR v_account IN
        SELECT a.account_id FROM accounts a
        WHERE a.account_id = ANY (v_locked)
          AND (a.subscription_renews_at <= v_now
               OR EXISTS (SELECT 1 FROM holds h WHERE h.account_id = a.account_id
                          AND h.status = 'pending' AND h.expires_at <= v_now)
               OR EXISTS (SELECT 1 FROM grants g WHERE g.account_id = a.account_id
                          AND g.remaining > 0 AND g.expires_at <= v_now))
        ORDER BY a.account_id
    LOOP
        PERFORM tally_lock_account(v_account);
    END LOOP;

    -- Each item's outcome: refused alone (unknown account, recorded before, unknown
    -- product), or a candidate; candidates of an account whose group fits are accepted
    -- (the first occurrence of an event id; the later ones are its duplicates or reuse
    -- it), the others ('slow') are decided in order below.
    WITH base AS (
        SELECT i.pos, i.account_id, i.event_id, i.fingerprint, i.charge,
               a.balance - a.reserved AS available, a.overdraft_limit,
               CASE WHEN a.account_id IS NULL THEN 'account'
                    WHEN e.fingerprint = i.fingerprint THEN 'stored'
                    WHEN e.fingerprint IS NOT NULL THEN 'reused'
                    WHEN i.charge IS NULL THEN 'product' END AS refused
        FROM unnest(v_items) i
        LEFT JOIN accounts a ON a.account_id = i.account_id AND a.account_id = ANY (v_locked)
        LEFT JOIN usage_events e ON e.account_id = i.account_id AND e.event_id = i.event_id
    ), candidate AS (
        SELECT b.*, first_value(b.pos) OVER k AS first_pos,
               first_value(b.fingerprint) OVER k AS first_fingerprint
        FROM base b WHERE b.refused IS NULL
        WINDOW k AS (PARTITION BY b.account_id, b.event_id ORDER BY b.pos)
    ), fits AS (
        SELECT c.account_id,
               bool_and(c.available - total >= -c.overdraft_limit OR total = 0) AS fits
        FROM (SELECT c.*, sum(c.charge) FILTER (WHERE c.pos = c.first_pos)
                              OVER (PARTITION BY c.account_id) AS total
              FROM candidate c) c
        GROUP BY c.account_id
    )
    SELECT array_agg(o.outcome ORDER BY o.pos), array_agg(o.winner ORDER BY o.pos)
    INTO v_outcome, v_winner
    FROM (
        SELECT b.pos,
               coalesce(b.refused, CASE WHEN NOT f.fits THEN 'slow'
                                        WHEN c.first_pos = c.pos THEN 'new'
                                        WHEN c.first_fingerprint = c.fingerprint THEN 'dup'
                                        ELSE 'reused' END) AS outcome,
               CASE WHEN f.fits THEN c.first_pos END AS winner
        FROM base b
        LEFT JOIN candidate c ON c.pos = b.pos
        LEFT JOIN fits f ON f.account_id = b.account_id
    ) o;

    -- The accounts whose group does not fit: one pass each, in order.
    v_available := array_fill(NULL::bigint, ARRAY[array_length(v_items, 1)]);
    IF 'slow' = ANY (v_outcome) THEN
        SELECT array_agg(i.fingerprint ORDER BY i.pos) INTO v_fingerprints FROM unnest(v_items) i;
        v_account := NULL;
        FOR v_slow IN
            SELECT i.pos, i.account_id, i.charge, i.fingerprint,
                   lag(i.pos) OVER (PARTITION BY i.account_id, i.event_id ORDER BY i.pos)
                       AS previous,
                   a.balance - a.reserved AS available, a.overdraft_limit
            FROM unnest(v_items) i
            JOIN unnest(v_outcome) WITH ORDINALITY AS o(outcome, pos) ON o.pos = i.pos
            JOIN accounts a ON a.account_id = i.account_id
            WHERE o.outcome = 'slow'
            ORDER BY i.pos
        LOOP
            IF v_account IS DISTINCT FROM v_slow.account_id THEN
                v_account := v_slow.account_id;
                v_left := v_slow.available;
            END IF;
            v_won := CASE WHEN v_slow.previous IS NOT NULL THEN v_winner[v_slow.previous] END;
            IF v_won IS NOT NULL THEN
                v_winner[v_slow.pos] := v_won;
                v_outcome[v_slow.pos] := CASE WHEN v_fingerprints[v_won] = v_slow.fingerprint
                                         THEN 'dup' ELSE 'reused' END;
            ELSIF v_slow.charge > 0 AND v_left - v_slow.charge < -v_slow.overdraft_limit THEN
                v_outcome[v_slow.pos] := 'insufficient';
                v_available[v_slow.pos] := v_left;
            ELSE
                v_outcome[v_slow.pos] := 'new';
                v_winner[v_slow.pos] := v_slow.pos;
                v_left := v_left - v_slow.charge;
            END IF;
        END LOOP;
    END IF;

    -- The writes, and every item's result, in one statement.
    WITH item AS (
        SELECT i.*, o.outcome, o.winner, o.available
        FROM unnest(v_items) i
        JOIN unnest(v_outcome, v_winner, v_available) WITH ORDINALITY
             AS o(outcome, winner, available, pos) ON o.pos = i.pos
    ), new AS (
        SELECT i.*, sum(i.charge) OVER w AS spent,
               count(*) FILTER (WHERE i.charge > 0) OVER w AS k
        FROM item i WHERE i.outcome = 'new'
        WINDOW w AS (PARTITION BY i.account_id ORDER BY i.pos)
    ), per_account AS (
        SELECT n.account_id, sum(n.charge) AS charged,
               count(*) FILTER (WHERE n.charge > 0) AS entries, count(*) AS events
        FROM new n GROUP BY n.account_id
    ), account AS (
        UPDATE accounts a
        SET balance = a.balance - p.charged,
            last_sequence = a.last_sequence + p.entries,
            balance_updated_at = CASE WHEN p.entries > 0
                                      THEN greatest(a.balance_updated_at, clock_timestamp())
                                      ELSE a.balance_updated_at END,
            usage_requests = a.usage_requests + p.events,
            last_activity_at = greatest(a.last_activity_at, clock_timestamp())
        FROM per_account p
        WHERE a.account_id = p.account_id
        RETURNING a.account_id, a.balance + p.charged AS before, p.charged,
                  a.last_sequence - p.entries AS sequence, a.balance_updated_at AS at
    ), drawable AS (
        -- Live grants in tally_draw_grants' order, each with the end of its range in
        -- the account's drawable credit (which is max(balance, 0), invariant 5).
        SELECT g.account_id, g.grant_type,
               sum(g.remaining) OVER (PARTITION BY g.account_id
                                      ORDER BY g.priority, g.expires_at NULLS LAST,
                                               g.created_at, g.grant_id) AS upto
        FROM grants g
        WHERE g.account_id IN (SELECT p.account_id FROM per_account p WHERE p.charged > 0)
          AND g.remaining > 0
    ), credit_type AS (
        -- An entry's credit type is the type of the first grant it draws from: the one
        -- holding the first micro-credit after what the entries before it spent. An
        -- entry that finds no positive balance draws nothing (and has none).
        SELECT DISTINCT ON (n.pos) n.pos, d.grant_type
        FROM new n
        JOIN account a ON a.account_id = n.account_id
        JOIN drawable d ON d.account_id = n.account_id AND d.upto > n.spent - n.charge
        WHERE n.charge > 0 AND a.before - (n.spent - n.charge) > 0
        ORDER BY n.pos, d.upto
    ), entry AS (
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at, credit_type)
        SELECT n.account_id, a.sequence + n.k, 'debit', -n.charge, a.before - n.spent,
               'usage ' || n.product_id || coalesce(' ' || nullif(n.endpoint, ''), ''),
               n.event_id,
               jsonb_build_object('event_id', n.event_id, 'product_id', n.product_id),
               n.event_id, a.at, t.grant_type
        FROM new n
        JOIN account a ON a.account_id = n.account_id
        LEFT JOIN credit_type t ON t.pos = n.pos
        WHERE n.charge > 0
        ORDER BY n.account_id, n.k
        RETURNING entry_id, account_id, sequence, entry_type, amount, balance_after,
                  description, reference, metadata, request_id, created_at, credit_type
    ), event AS (
        INSERT INTO usage_events (
            account_id, event_id, product_id, endpoint, status, success, status_code,
            message, quantity, credits, credit_type, started_at, completed_at,
            processing_time_ms, request_metadata, result_metadata, webhook_url, entry_id,
            fingerprint, finish_fingerprint)
        SELECT n.account_id, n.event_id, n.product_id, n.endpoint, n.status, n.success,
               n.status_code, n.message, n.quantity, n.charge,
               CASE WHEN e.credit_type = 'subscription' THEN 'subscription'
                    ELSE 'purchased' END,
               n.started_at, n.completed_at, n.processing_time_ms, n.request_metadata,
               n.result_metadata, n.webhook_url, e.entry_id, n.fingerprint, n.fingerprint
        FROM new n
        JOIN account a ON a.account_id = n.account_id
        LEFT JOIN entry e ON n.charge > 0 AND e.account_id = n.account_id
                         AND e.sequence = a.sequence + n.k
        ORDER BY n.account_id, n.pos
        RETURNING account_id, event_id, product_id, status, credits, credit_type,
                  created_at, entry_id
    ), rollup AS (
        INSERT INTO usage_rollups AS r (account_id, bucket_start, product_id, endpoint,
                                        requests, successful, failed, credits, quantity)
        SELECT n.account_id,
               date_bin('15 minutes', n.started_at, timestamptz '2000-01-01 00:00:00+00'),
               n.product_id, n.endpoint, count(*), count(*) FILTER (WHERE n.success),
               count(*) FILTER (WHERE NOT n.success), sum(n.charge), sum(n.quantity)
        FROM new n
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, bucket_start, product_id, endpoint) DO UPDATE
        SET requests = r.requests + excluded.requests,
            successful = r.successful + excluded.successful,
            failed = r.failed + excluded.failed,
            credits = r.credits + excluded.credits,
            quantity = r.quantity + excluded.quantity
    )
    SELECT
        (SELECT jsonb_agg(CASE
             WHEN i.outcome IN ('new', 'dup') THEN jsonb_build_object(
                 'index', i.idx, 'written', true, 'of', w.idx, 'duplicate', i.outcome = 'dup',
                 'event', to_jsonb(ev), 'entry', to_jsonb(en))
             WHEN i.outcome = 'stored' THEN jsonb_build_object('index', i.idx)
                 || tally_event_result(s, true)
             WHEN i.outcome = 'insufficient' THEN jsonb_build_object(
                 'index', i.idx, 'error', 'INSUFFICIENT_CREDITS', 'available', i.available,
                 'requested', i.charge, 'overdraft_limit', ac.overdraft_limit)
             ELSE jsonb_build_object('index', i.idx, 'error', CASE i.outcome
                 WHEN 'account' THEN 'ACCOUNT_NOT_FOUND'
                 WHEN 'product' THEN 'PRODUCT_NOT_FOUND'
                 ELSE 'EVENT_ID_REUSED' END) END)
         FROM item i
         LEFT JOIN item w ON w.pos = i.winner
         LEFT JOIN event ev ON i.outcome IN ('new', 'dup') AND ev.account_id = i.account_id
                           AND ev.event_id = i.event_id
         LEFT JOIN entry en ON en.entry_id = ev.entry_id
         LEFT JOIN usage_events s ON i.outcome = 'stored' AND s.account_id = i.account_id
                                 AND s.event_id = i.event_id
         LEFT JOIN accounts ac ON i.outcome = 'insufficient' AND ac.account_id = i.account_id),
        (SELECT array_agg(a.account_id ORDER BY a.account_id) FROM account a
         WHERE a.charged > 0),
        (SELECT array_agg(a.charged ORDER BY a.account_id) FROM account a WHERE a.charged > 0),
        (SELECT array_agg(a.before ORDER BY a.account_id) FROM account a WHERE a.charged > 0)
    INTO v_results, v_charged_accounts, v_charged, v_before;

    -- Grants: each account's draw at once (what its entries drew one by one).
    FOR n IN 1 .. coalesce(array_length(v_charged_accounts, 1), 0) LOOP
        IF v_before[n] > 0 THEN
            PERFORM tally_draw_grants(v_charged_accounts[n], least(v_charged[n], v_before[n]));
        END IF;
    END LOOP;
    -- Auto-reload once per account, on its available credit before and after the group.
    FOR v_row IN
        SELECT * FROM accounts
        WHERE account_id = ANY (v_charged_accounts) AND auto_reload_enabled
        ORDER BY account_id
    LOOP
        PERFORM tally_maybe_reload(v_row, v_row.balance - v_row.reserved
            + v_charged[array_position(v_charged_accounts, v_row.account_id)]);
    END LOOP;
    RETURN jsonb_build_object('replayed', false, 'response', coalesce(v_results, '[]'::jsonb));
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
        credit_type = CASE WHEN e.entry_id IS NULL THEN credit_type
                           WHEN e.credit_type = 'subscription' THEN 'subscription'
                           ELSE 'purchased' END,
        finish_fingerprint = v_fingerprint
    WHERE account_id = ev.account_id AND event_id = ev.event_id
    RETURNING * INTO ev;
    PERFORM tally_roll_up(ev);
    RETURN jsonb_build_object('replayed', false, 'response', tally_event_result(ev, false));
END $$;
