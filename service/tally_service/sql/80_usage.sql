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

-- What a change of usage_rollups sets off (p_deltas: signed, per rollup row, in
-- (account_id, bucket_start, product_id, endpoint) order), from the triggers of
-- migration 0014 once per statement, or from tally_record_usage for its own rows:
-- the local days in usage_days (unless p_days is false: the caller upserted them), a
-- new version of each period report whose period holds a changed bucket, and the usage
-- thresholds crossed, bucket by bucket. Every writer of the rollups holds the account's
-- row lock, so the days and thresholds of one account are never written concurrently.
CREATE OR REPLACE FUNCTION tally_rollups_counted(p_deltas tally_rollup_delta[], p_days boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz;
    v_reports tally_report_delta[];
    v_delta tally_rollup_delta;
BEGIN
    IF p_days THEN
        INSERT INTO usage_days AS u (account_id, day, product_id, endpoint, requests,
                                     successful, failed, credits, quantity)
        SELECT d.account_id, (d.bucket_start AT TIME ZONE a.time_zone)::date, d.product_id,
               d.endpoint, sum(d.requests), sum(d.successful), sum(d.failed),
               sum(d.credits), sum(d.quantity)
        FROM unnest(p_deltas) d JOIN accounts a ON a.account_id = d.account_id
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, day, product_id, endpoint) DO UPDATE
        SET requests = u.requests + excluded.requests,
            successful = u.successful + excluded.successful,
            failed = u.failed + excluded.failed,
            credits = u.credits + excluded.credits,
            quantity = u.quantity + excluded.quantity;
    END IF;
    -- Reports are of closed periods: a change whose buckets all lie at or after the
    -- latest end of any report (every live write) stops at one index probe. Else each
    -- changed bucket before it is probed against its account's reports (one index probe
    -- each, forced by OFFSET 0: joined as sets, a large change would scan every report).
    v_until := (SELECT max(period_end) FROM period_reports);
    IF v_until IS NOT NULL
       AND EXISTS (SELECT 1 FROM unnest(p_deltas) d WHERE d.bucket_start < v_until) THEN
        SELECT array_agg(ROW(h.report_id, d.product_id, d.endpoint, d.requests, d.successful,
                             d.failed, d.credits, d.quantity)::tally_report_delta)
        INTO v_reports
        FROM unnest(p_deltas) d
        CROSS JOIN LATERAL (
            SELECT r.report_id FROM period_reports r
            WHERE r.account_id = d.account_id AND r.period_end > d.bucket_start
              AND r.period_start <= d.bucket_start
            OFFSET 0) h
        WHERE d.bucket_start < v_until;
        IF v_reports IS NOT NULL THEN
            PERFORM tally_reports_changed(v_reports);
        END IF;
    END IF;
    -- Usage thresholds: each changed bucket of an account with a live one, in order.
    FOR v_delta IN
        SELECT x.account_id, x.bucket_start, x.product_id, x.endpoint, x.requests,
               x.successful, x.failed, x.credits, x.quantity
        FROM unnest(p_deltas) WITH ORDINALITY x
        WHERE EXISTS (SELECT 1 FROM thresholds t
                      WHERE t.account_id = x.account_id AND t.metric <> 'available_credit'
                        AND t.deleted_at IS NULL)
        ORDER BY x.ordinality
    LOOP
        PERFORM tally_usage_counted(v_delta.account_id, v_delta.bucket_start,
                                    v_delta.requests, v_delta.credits);
    END LOOP;
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

-- PL/pgSQL, so its plan lasts the session (an SQL function with a sub-select is not
-- inlined, and would be planned again in every transaction).
CREATE OR REPLACE FUNCTION tally_event_result(ev usage_events, p_duplicate boolean) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'event', to_jsonb(ev),
        'entry', (SELECT to_jsonb(l) FROM ledger_entries l WHERE l.entry_id = ev.entry_id),
        'duplicate', p_duplicate);
END $$;

CREATE OR REPLACE FUNCTION tally_event_reused(p_account_id text, p_event_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event id reused' USING ERRCODE = 'TA419',
        DETAIL = json_build_object('account_id', p_account_id, 'event_id', p_event_id)::text;
END $$;

-- Records finished events (a batch, a stream's group, or one event) in one transaction,
-- with set operations: the events come as one array of records (tally_usage_event,
-- migration 0016: sent in binary, no text built per event), are expanded once and
-- priced by one join with the catalog; the accounts are locked once each, in
-- account_id order (so concurrent groups cannot deadlock); duplicates are found by one join on
-- (account_id, event_id); and each table is written once: one INSERT of the ledger
-- entries (one per charged event, numbered and chained per account), one of the events,
-- one upsert of pre-aggregated rollups, one UPDATE of the accounts; grants are drawn once
-- per account for its total, and auto-reload is decided once per account.
--
-- Each item succeeds or fails alone and nothing raises for a refusal; the answer is one
-- result per item (in any order), keyed by its "index":
--   {"error": "ACCOUNT_NOT_FOUND" | "PRODUCT_NOT_FOUND" | "EVENT_ID_REUSED" |
--             "BALANCE_LIMIT" (a price beyond BIGINT)}
--   {"error": "INSUFFICIENT_CREDITS", "available", "requested", "overdraft_limit"}
--   {"event": row, "entry": row | null, "duplicate": true}: recorded by an earlier call
--   [index, of, duplicate, credits, credit_type, created_at, entry_id, sequence,
--    balance_after, entry_created_at, product_id, status]: written by this call, by
--    the item "of" (whose duplicate this one is when they differ); only what the
--    database decided (entry_id and what follows it are null for an uncharged event;
--    the two instants as microseconds since the Unix epoch, exact integers).
--    The rest is the item "of" as sent, and the entry is the debit of its charge with
--    the description, reference and metadata tally_record_usage gives it (below); the
--    server builds the response from both (tally_service.servicers.metering).
--
-- The balance rule, per account, in index order: an event is refused when its charge
-- is positive and does not fit in the available credit left by the events accepted
-- before it (available - charge < -overdraft_limit); a later, smaller one may still fit.
-- When the account's whole group fits (the usual case) every event is accepted at once;
-- otherwise one pass over its events decides them in order. Within a group the first
-- accepted occurrence of an event id wins: later ones with the same payload are its
-- duplicates, with another payload EVENT_ID_REUSED; an occurrence refused before it
-- (unknown product, no credit) does not count, as if the items had come one by one.
CREATE OR REPLACE FUNCTION tally_record_usage(p_events tally_usage_event[]) RETURNS json
LANGUAGE plpgsql
-- Plans made once per session and kept: the statements are written so that any group
-- size runs in linear time whatever the planner guesses (no join of two computed
-- sets), and planning them afresh for every call would cost more than a small group.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_items tally_usage_item[];
    v_locked text[];
    v_mark text;
    v_account text;
    v_outcome text[];
    v_winner integer[];
    v_available bigint[];
    v_fingerprints bytea[];
    v_left bigint;
    v_won integer;
    v_slow record;
    v_row accounts;
    v_results json;
    v_charged_accounts text[];
    v_charged bigint[];
    v_before bigint[];
    v_new_accounts text[];
    v_counted tally_rollup_delta[];
    v_stamp jsonb;
    v_at timestamptz;
    v_due text[];
    v_products bigint;
    v_reload boolean;
BEGIN
    -- Lock every account of the group once, in account_id order; then catch up (as
    -- tally_lock_account does) on those with something due (tally_due_accounts, as
    -- tally_balance). One statement: the test runs once every row is locked (holds and
    -- grants change only under that lock), on the clock read after the lock wait (by the
    -- aggregate, once it has every locked row), so what fell due while waiting counts.
    -- The clock comes in as a column, not as clock_timestamp() in the call: a volatile
    -- argument would keep the SQL function from being inlined, and it would be planned
    -- again in every call (about 0.5 ms). The group's products are locked FOR KEY SHARE
    -- before they are read, as usage_events_references would lock them after the write
    -- (the write statement below skips it), so none is deleted under the group.
    SELECT l.ids, (SELECT array_agg(d ORDER BY d) FROM tally_due_accounts(l.ids, l.now) d),
           (SELECT count(*) FROM (SELECT 1 FROM products p
                                  WHERE p.product_id IN (SELECT e.product_id
                                                         FROM unnest(p_events) e)
                                  FOR KEY SHARE) k)
    INTO v_locked, v_due, v_products
    FROM (SELECT array_agg(x.account_id) AS ids, clock_timestamp() AS now
          FROM (SELECT account_id FROM accounts
                WHERE account_id IN (SELECT e.account_id FROM unnest(p_events) e)
                ORDER BY account_id FOR UPDATE) x) l;
    IF v_due IS NOT NULL THEN
        FOREACH v_account IN ARRAY v_due LOOP
            PERFORM tally_lock_account(v_account);
        END LOOP;
    END IF;

    -- The events, priced, in (account_id, index) order: pos is the array subscript.
    SELECT array_agg(ROW(
               x.pos, x.idx, x.account_id, x.event_id, x.product_id, x.endpoint, x.status,
               x.success, x.status_code, x.message, x.quantity,
               CASE WHEN p.product_id IS NULL THEN NULL
                    -- a price out of BIGINT's range: -1, refused alone (BALANCE_LIMIT)
                    WHEN x.credits IS NULL AND (x.status <> 'failed' OR p.charge_failed)
                         AND p.credits_per_unit::numeric * x.quantity
                             > 9223372036854775807 THEN -1
                    ELSE tally_price(p, x.quantity, x.status, x.credits) END,
               x.started_at, x.completed_at, x.processing_time_ms, x.request_metadata::jsonb,
               x.result_metadata::jsonb, x.webhook_url, x.fingerprint
           )::tally_usage_item ORDER BY x.pos)
    INTO v_items
    FROM (SELECT e.*, row_number() OVER (ORDER BY e.account_id COLLATE "C", e.idx) AS pos
          FROM unnest(p_events) e) x
    LEFT JOIN products p ON p.product_id = x.product_id;
    IF v_items IS NULL THEN
        RETURN json_build_object('replayed', false, 'response', '[]'::json);
    END IF;

    -- Each item's outcome: refused alone (unknown account, recorded before, unknown
    -- product), or a candidate. The candidates of an account whose group fits are
    -- accepted: the first occurrence of each event id is new, the later ones are its
    -- duplicates or reuse it. The others ('slow') are decided in order below. (Window
    -- functions over one scan, no join of two computed sets, and one index probe per
    -- event for a stored one: a LATERAL subquery with OFFSET 0, since a generic plan made
    -- while usage_events was small hashed all of it, 15-25 ms a call once it held 50,000
    -- rows. Linear in the group whatever the planner guesses.)
    WITH base AS (
        SELECT i.pos, i.account_id, i.event_id, i.fingerprint, i.charge,
               a.balance - a.reserved AS available, a.overdraft_limit,
               CASE WHEN a.account_id IS NULL THEN 'account'
                    WHEN e.fingerprint = i.fingerprint THEN 'stored'
                    WHEN e.fingerprint IS NOT NULL THEN 'reused'
                    WHEN i.charge IS NULL THEN 'product'
                    WHEN i.charge < 0 THEN 'limit' END AS refused
        FROM unnest(v_items) i
        LEFT JOIN accounts a ON a.account_id = i.account_id AND a.account_id = ANY (v_locked)
        LEFT JOIN LATERAL (
            SELECT e.fingerprint FROM usage_events e
            WHERE e.account_id = i.account_id AND e.event_id = i.event_id
            OFFSET 0) e ON true
    ), keyed AS (
        SELECT b.*, first_value(b.pos) OVER k AS first_pos,
               first_value(b.fingerprint) OVER k AS first_fingerprint
        FROM base b
        WINDOW k AS (PARTITION BY b.account_id COLLATE "C", b.event_id COLLATE "C",
                     b.refused IS NULL ORDER BY b.pos)
    ), judged AS (
        SELECT k.*,
               k.refused IS NULL AND sum(k.charge) FILTER (
                   WHERE k.refused IS NULL AND k.pos = k.first_pos
               ) OVER (PARTITION BY k.account_id COLLATE "C") > k.available + k.overdraft_limit
                   AS slow
        FROM keyed k
    )
    SELECT array_agg(CASE WHEN j.refused IS NOT NULL THEN j.refused
                          WHEN j.slow THEN 'slow'
                          WHEN j.pos = j.first_pos THEN 'new'
                          WHEN j.fingerprint = j.first_fingerprint THEN 'dup'
                          ELSE 'reused' END ORDER BY j.pos),
           array_agg(CASE WHEN j.refused IS NULL AND NOT j.slow THEN j.first_pos END
                     ORDER BY j.pos),
           -- the accounts that may have new events (all of them unless refused)
           array_agg(DISTINCT j.account_id) FILTER (WHERE j.refused IS NULL)
    INTO v_outcome, v_winner, v_new_accounts
    FROM judged j;

    -- The accounts whose group does not fit: one pass each, in order.
    v_available := array_fill(NULL::bigint, ARRAY[array_length(v_items, 1)]);
    IF 'slow' = ANY (v_outcome) THEN
        SELECT array_agg(i.fingerprint ORDER BY i.pos) INTO v_fingerprints FROM unnest(v_items) i;
        v_account := NULL;
        FOR v_slow IN
            SELECT (u.i).pos, (u.i).account_id, (u.i).charge, (u.i).fingerprint,
                   lag((u.i).pos) OVER (PARTITION BY (u.i).account_id COLLATE "C",
                                                     (u.i).event_id COLLATE "C"
                                        ORDER BY (u.i).pos) AS previous,
                   a.balance - a.reserved AS available, a.overdraft_limit
            FROM (SELECT unnest(v_items) AS i, unnest(v_outcome) AS outcome) u
            JOIN accounts a ON a.account_id = (u.i).account_id
            WHERE u.outcome = 'slow'
            ORDER BY (u.i).pos
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

    -- What the ledger_entries_caller trigger adds to each entry's metadata.
    v_stamp := CASE WHEN coalesce(current_setting('tally.caller', true), '') <> ''
                    THEN jsonb_build_object('caller', current_setting('tally.caller', true))
                    ELSE '{}' END;
    v_at := clock_timestamp();

    -- The triggers of usage_rollups leave the statement below to this function: it
    -- counts its own rollups (migration 0015). And the references of its entries and
    -- events are checked already (the mark of migrations 0017 and 0018): every account
    -- is locked FOR UPDATE (v_locked) and every product FOR KEY SHARE (above), and the
    -- statement inserts the entries its events refer to.
    v_mark := set_config('tally.rollups_counted', 'on', true);
    v_mark := set_config('tally.references_checked', 'on', true);
    -- The writes, and every item's result, in one statement. The accepted events flow
    -- through window functions and are written from one materialised set; nothing
    -- joins two computed sets (their sizes are unknown to the planner).
    WITH new AS (
        -- Accepted events, with their account as it was before the group: an entry's
        -- sequence and balance_after follow from the running count and sum.
        SELECT u.i AS e, a.balance AS before, a.last_sequence AS sequence,
               greatest(a.balance_updated_at, v_at) AS at,
               sum((u.i).charge) OVER w AS spent,
               count(*) FILTER (WHERE (u.i).charge > 0) OVER w AS k
        FROM (SELECT unnest(v_items) AS i, unnest(v_outcome) AS outcome) u
        JOIN accounts a ON a.account_id = (u.i).account_id
        WHERE u.outcome = 'new'
        WINDOW w AS (PARTITION BY (u.i).account_id COLLATE "C" ORDER BY (u.i).pos)
    ), stream AS (
        -- The events, merged with the live grants of their accounts in
        -- tally_draw_grants' order, each grant at the end of its range of the
        -- account's drawable credit (max(balance, 0), invariant 5).
        SELECT n.e, n.before, n.sequence, n.at, n.spent, n.k, (n.e).account_id AS account_id,
               n.spent - (n.e).charge AS point, 0 AS kind, NULL::text AS grant_type
        FROM new n
        UNION ALL
        SELECT NULL::tally_usage_item, NULL, NULL, NULL, NULL, NULL, g.account_id,
               sum(g.remaining) OVER (PARTITION BY g.account_id
                                      ORDER BY g.priority, g.expires_at NULLS LAST,
                                               g.created_at, g.grant_id),
               1, g.grant_type
        FROM grants g
        WHERE g.account_id = ANY (v_new_accounts) AND NOT g.spent
    ), drawn AS (
        -- An entry's credit type is the type of the first grant it draws from: the
        -- first grant whose range ends after what the entries before it spent.
        SELECT s.*, first_value(s.grant_type) OVER (
                        PARTITION BY s.account_id COLLATE "C", s.grp ORDER BY s.kind DESC)
                    AS first_grant
        FROM (SELECT s.*, count(*) FILTER (WHERE s.kind = 1) OVER (
                            PARTITION BY s.account_id COLLATE "C" ORDER BY s.point DESC, s.kind
                            ROWS UNBOUNDED PRECEDING) AS grp
              FROM stream s) s
    ), written AS MATERIALIZED (
        SELECT d.e, d.before, d.spent, d.at, d.sequence + d.k AS sequence,
               CASE WHEN (d.e).charge > 0
                    THEN nextval('ledger_entries_entry_id_seq'::regclass) END AS entry_id,
               -- an entry that finds no positive balance draws nothing
               CASE WHEN (d.e).charge > 0 AND d.before - d.point > 0 THEN d.first_grant END
                   AS entry_credit_type,
               clock_timestamp() AS created_at
        FROM drawn d
        WHERE d.kind = 0
        ORDER BY (d.e).pos  -- entry ids in sequence order (nextval runs after the sort)
    ), entry AS (
        INSERT INTO ledger_entries (
            entry_id, account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at, credit_type)
        OVERRIDING SYSTEM VALUE
        SELECT w.entry_id, (w.e).account_id, w.sequence, 'debit', -(w.e).charge,
               w.before - w.spent,
               'usage ' || (w.e).product_id || coalesce(' ' || nullif((w.e).endpoint, ''), ''),
               (w.e).event_id,
               jsonb_build_object('event_id', (w.e).event_id, 'product_id', (w.e).product_id)
                   || v_stamp,
               (w.e).event_id, w.at, w.entry_credit_type
        FROM written w
        WHERE w.entry_id IS NOT NULL
        ORDER BY (w.e).account_id, w.sequence
    ), event AS (
        INSERT INTO usage_events (
            account_id, event_id, product_id, endpoint, status, success, status_code,
            message, quantity, credits, credit_type, started_at, completed_at,
            processing_time_ms, request_metadata, result_metadata, webhook_url, created_at,
            entry_id, fingerprint, finish_fingerprint)
        SELECT (w.e).account_id, (w.e).event_id, (w.e).product_id, (w.e).endpoint,
               (w.e).status, (w.e).success, (w.e).status_code, (w.e).message,
               (w.e).quantity, (w.e).charge,
               CASE WHEN w.entry_credit_type = 'subscription' THEN 'subscription'
                    ELSE 'purchased' END,
               (w.e).started_at, (w.e).completed_at, (w.e).processing_time_ms,
               (w.e).request_metadata, (w.e).result_metadata, (w.e).webhook_url,
               w.created_at, w.entry_id, (w.e).fingerprint, (w.e).fingerprint
        FROM written w
        ORDER BY (w.e).account_id, (w.e).pos
    ), counted AS MATERIALIZED (
        -- What the group adds to each rollup row: written to the rollups and to the
        -- local days here, passed on to tally_rollups_counted below.
        SELECT (w.e).account_id,
               date_bin('15 minutes', (w.e).started_at, timestamptz '2000-01-01 00:00:00+00')
                   AS bucket_start,
               (w.e).product_id, (w.e).endpoint, count(*) AS requests,
               count(*) FILTER (WHERE (w.e).success) AS successful,
               count(*) FILTER (WHERE NOT (w.e).success) AS failed,
               sum((w.e).charge)::bigint AS credits, sum((w.e).quantity)::bigint AS quantity
        FROM written w
        GROUP BY 1, 2, 3, 4
    ), rollup AS (
        INSERT INTO usage_rollups AS r (account_id, bucket_start, product_id, endpoint,
                                        requests, successful, failed, credits, quantity)
        SELECT c.account_id, c.bucket_start, c.product_id, c.endpoint, c.requests,
               c.successful, c.failed, c.credits, c.quantity
        FROM counted c
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, bucket_start, product_id, endpoint) DO UPDATE
        SET requests = r.requests + excluded.requests,
            successful = r.successful + excluded.successful,
            failed = r.failed + excluded.failed,
            credits = r.credits + excluded.credits,
            quantity = r.quantity + excluded.quantity
    ), day AS (
        -- usage_days, as the triggers of usage_rollups keep it for other writers (the
        -- accounts' time zones as they are: the account CTE below changes no zone).
        INSERT INTO usage_days AS u (account_id, day, product_id, endpoint, requests,
                                     successful, failed, credits, quantity)
        SELECT c.account_id, (c.bucket_start AT TIME ZONE a.time_zone)::date, c.product_id,
               c.endpoint, sum(c.requests), sum(c.successful), sum(c.failed),
               sum(c.credits), sum(c.quantity)
        FROM counted c JOIN accounts a ON a.account_id = c.account_id
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, day, product_id, endpoint) DO UPDATE
        SET requests = u.requests + excluded.requests,
            successful = u.successful + excluded.successful,
            failed = u.failed + excluded.failed,
            credits = u.credits + excluded.credits,
            quantity = u.quantity + excluded.quantity
    ), account AS (
        UPDATE accounts a
        SET balance = a.balance - p.charged,
            last_sequence = a.last_sequence + p.entries,
            balance_updated_at = CASE WHEN p.entries > 0 THEN p.at
                                      ELSE a.balance_updated_at END,
            usage_requests = a.usage_requests + p.events,
            last_activity_at = greatest(a.last_activity_at, v_at)
        FROM (SELECT (w.e).account_id, sum((w.e).charge) AS charged,
                     count(w.entry_id) AS entries, count(*) AS events, max(w.at) AS at
              FROM written w GROUP BY (w.e).account_id) p
        WHERE a.account_id = p.account_id
        RETURNING a.account_id, a.balance + p.charged AS before, p.charged,
                  a.auto_reload_enabled
    ), result AS (
        -- What this call wrote, per event: only what the database decided.
        SELECT (w.e).pos, (w.e).idx, (w.e).charge,
               CASE WHEN w.entry_credit_type = 'subscription' THEN 'subscription'
                    ELSE 'purchased' END AS credit_type,
               (extract(epoch FROM w.created_at) * 1000000)::bigint AS created_at, w.entry_id,
               CASE WHEN w.entry_id IS NOT NULL THEN w.sequence END AS sequence,
               CASE WHEN w.entry_id IS NOT NULL THEN w.before - w.spent END AS balance_after,
               CASE WHEN w.entry_id IS NOT NULL
                    THEN (extract(epoch FROM w.at) * 1000000)::bigint END AS entry_created_at,
               (w.e).product_id, (w.e).status
        FROM written w
    )
    -- The answer is json (text), not jsonb: built by concatenation, with no binary
    -- form made and taken apart again on the way out.
    SELECT
        (SELECT json_agg(x.body) FROM (
             SELECT json_build_array(r.idx, r.idx, false, r.charge, r.credit_type,
                                     r.created_at, r.entry_id, r.sequence, r.balance_after,
                                     r.entry_created_at, r.product_id, r.status) AS body
             FROM result r
             UNION ALL
             SELECT CASE u.outcome
                 WHEN 'dup' THEN (SELECT json_build_array(
                                             (u.i).idx, r.idx, true, r.charge, r.credit_type,
                                             r.created_at, r.entry_id, r.sequence,
                                             r.balance_after, r.entry_created_at,
                                             r.product_id, r.status)
                                  FROM result r WHERE r.pos = u.winner)
                 WHEN 'stored' THEN (jsonb_build_object('index', (u.i).idx)
                     || (SELECT tally_event_result(s, true) FROM usage_events s
                         WHERE s.account_id = (u.i).account_id
                           AND s.event_id = (u.i).event_id))::json
                 WHEN 'insufficient' THEN json_build_object(
                     'index', (u.i).idx, 'error', 'INSUFFICIENT_CREDITS',
                     'available', u.available, 'requested', (u.i).charge,
                     'overdraft_limit', (SELECT a.overdraft_limit FROM accounts a
                                         WHERE a.account_id = (u.i).account_id))
                 ELSE json_build_object('index', (u.i).idx, 'error', CASE u.outcome
                     WHEN 'account' THEN 'ACCOUNT_NOT_FOUND'
                     WHEN 'product' THEN 'PRODUCT_NOT_FOUND'
                     WHEN 'limit' THEN 'BALANCE_LIMIT'
                     ELSE 'EVENT_ID_REUSED' END) END
             FROM (SELECT unnest(v_items) AS i, unnest(v_outcome) AS outcome,
                          unnest(v_winner) AS winner, unnest(v_available) AS available) u
             WHERE u.outcome <> 'new') x),
        p.accounts, p.charged, p.before, p.reload,
        -- The rollup changes, only if a report or a threshold can care: a bucket before
        -- the latest end of a report, or an account with a live usage threshold (the
        -- tests of tally_rollups_counted). The days are written above.
        (SELECT CASE WHEN bool_or(
                         c.bucket_start < (SELECT max(r.period_end) FROM period_reports r)
                         OR EXISTS (SELECT 1 FROM thresholds t
                                    WHERE t.account_id = c.account_id
                                      AND t.metric <> 'available_credit'
                                      AND t.deleted_at IS NULL))
                     THEN array_agg(ROW(c.account_id, c.bucket_start, c.product_id,
                                        c.endpoint, c.requests, c.successful, c.failed,
                                        c.credits, c.quantity)::tally_rollup_delta
                                    ORDER BY c.account_id, c.bucket_start, c.product_id,
                                             c.endpoint) END
         FROM counted c)
    INTO v_results, v_charged_accounts, v_charged, v_before, v_reload, v_counted
    FROM (SELECT array_agg(a.account_id ORDER BY a.account_id)
                     FILTER (WHERE a.charged > 0) AS accounts,
                 array_agg(a.charged ORDER BY a.account_id) FILTER (WHERE a.charged > 0)
                     AS charged,
                 array_agg(a.before ORDER BY a.account_id) FILTER (WHERE a.charged > 0)
                     AS before,
                 bool_or(a.auto_reload_enabled) FILTER (WHERE a.charged > 0) AS reload
          FROM account a) p;
    v_mark := set_config('tally.rollups_counted', '', true);
    v_mark := set_config('tally.references_checked', '', true);
    -- The reports and thresholds the rollups above touched.
    IF v_counted IS NOT NULL THEN
        PERFORM tally_rollups_counted(v_counted, false);
    END IF;

    -- Grants: every charged account's draw at once, by one call (tally_draw): what its
    -- entries drew one by one, the charge up to the positive part of its balance.
    IF v_charged_accounts IS NOT NULL THEN
        PERFORM count(*) FROM tally_draw(
            v_charged_accounts,
            ARRAY(SELECT least(u.charged, greatest(u.before, 0))
                  FROM unnest(v_charged, v_before) WITH ORDINALITY AS u (charged, before, n)
                  ORDER BY u.n));
    END IF;
    -- Auto-reload once per account, on its available credit before and after the group
    -- (v_reload: a charged account has it enabled).
    IF v_reload THEN
        FOR v_row IN
            SELECT * FROM accounts
            WHERE account_id = ANY (v_charged_accounts) AND auto_reload_enabled
            ORDER BY account_id
        LOOP
            PERFORM tally_maybe_reload(v_row, v_row.balance - v_row.reserved
                + v_charged[array_position(v_charged_accounts, v_row.account_id)]);
        END LOOP;
    END IF;
    RETURN json_build_object('replayed', false, 'response', coalesce(v_results, '[]'::json));
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
        credit_type = CASE WHEN e.entry_id IS NULL THEN credit_type
                           WHEN e.credit_type = 'subscription' THEN 'subscription'
                           ELSE 'purchased' END,
        finish_fingerprint = v_fingerprint
    WHERE account_id = ev.account_id AND event_id = ev.event_id
    RETURNING * INTO ev;
    PERFORM tally_roll_up(ev);
    RETURN jsonb_build_object('replayed', false, 'response', tally_event_result(ev, false));
END $$;
