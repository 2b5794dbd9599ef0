-- The auto-reload rule on a row already in hand (after the movement).
CREATE OR REPLACE FUNCTION tally_maybe_reload(a accounts, p_available_before bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF a.auto_reload_enabled AND p_available_before >= a.auto_reload_threshold
       AND a.balance - a.reserved < a.auto_reload_threshold THEN
        PERFORM tally_decide_reload(a);
    END IF;
END $$;

-- Writes a reload intent if none is in flight: PENDING, or SKIPPED past a cap.
CREATE OR REPLACE FUNCTION tally_decide_reload(a accounts) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_local timestamp := v_now AT TIME ZONE a.time_zone;
    v_reason text;
    v_intent uuid;
BEGIN
    IF EXISTS (SELECT 1 FROM reload_intents
               WHERE account_id = a.account_id AND status = 'pending') THEN
        RETURN;
    END IF;
    IF a.auto_reload_max_per_day > 0 AND (
        SELECT count(*) FROM reload_intents
        WHERE account_id = a.account_id AND status = 'succeeded'
          AND created_at >= date_trunc('day', v_local) AT TIME ZONE a.time_zone
    ) >= a.auto_reload_max_per_day THEN
        v_reason := format('max_reloads_per_day (%s) reached', a.auto_reload_max_per_day);
    ELSIF a.auto_reload_max_per_month > 0 AND (
        SELECT coalesce(sum(amount), 0) FROM reload_intents
        WHERE account_id = a.account_id AND status = 'succeeded'
          AND created_at >= date_trunc('month', v_local) AT TIME ZONE a.time_zone
    ) + a.auto_reload_amount > a.auto_reload_max_per_month THEN
        v_reason := 'max_amount_per_month reached';
    END IF;
    INSERT INTO reload_intents (account_id, status, amount, error, finished_at)
    VALUES (a.account_id, CASE WHEN v_reason IS NULL THEN 'pending' ELSE 'skipped' END,
            a.auto_reload_amount, coalesce(v_reason, ''),
            CASE WHEN v_reason IS NULL THEN NULL ELSE v_now END)
    RETURNING intent_id INTO v_intent;
    IF v_reason IS NULL THEN
        PERFORM pg_notify('tally_reloads', v_intent::text);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION tally_set_auto_reload(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_enabled boolean,
    p_threshold bigint, p_amount bigint, p_max_per_day integer, p_max_per_month bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r jsonb;
BEGIN
    a := tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'SetAutoReload', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE accounts SET
        auto_reload_enabled = p_enabled,
        auto_reload_threshold = p_threshold,
        auto_reload_amount = p_amount,
        auto_reload_max_per_day = p_max_per_day,
        auto_reload_max_per_month = p_max_per_month,
        auto_reload_disabled_reason = '',
        updated_at = clock_timestamp()
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    -- Already below the threshold: no crossing will come, so decide now.
    IF a.auto_reload_enabled AND a.balance - a.reserved < a.auto_reload_threshold THEN
        PERFORM tally_decide_reload(a);
    END IF;
    RETURN tally_remember(p_request_id, 'SetAutoReload', p_fingerprint,
                          jsonb_build_object('account', to_jsonb(a)));
END $$;

-- The worker claims a due intent for a lease; a crash lets the lease lapse and the
-- intent is claimed again with the same id (the funding hook's idempotency key).
CREATE OR REPLACE FUNCTION tally_claim_reload(p_lease_seconds integer) RETURNS reload_intents
LANGUAGE plpgsql AS $$
DECLARE
    i reload_intents;
BEGIN
    UPDATE reload_intents
    SET lease_until = clock_timestamp() + make_interval(secs => p_lease_seconds),
        attempts = attempts + 1
    WHERE intent_id = (
        SELECT intent_id FROM reload_intents
        WHERE status = 'pending' AND next_attempt_at <= clock_timestamp()
          AND (lease_until IS NULL OR lease_until < clock_timestamp())
        ORDER BY next_attempt_at LIMIT 1
        FOR UPDATE SKIP LOCKED)
    RETURNING * INTO i;
    RETURN i;
END $$;

CREATE OR REPLACE FUNCTION tally_reload_succeeded(p_intent_id uuid, p_charge_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    i reload_intents;
    e ledger_entries;
BEGIN
    SELECT * INTO i FROM reload_intents WHERE intent_id = p_intent_id;
    PERFORM tally_lock_account(i.account_id);
    SELECT * INTO i FROM reload_intents WHERE intent_id = p_intent_id;
    IF i.status <> 'pending' THEN
        RETURN to_jsonb(i);  -- already done by another worker: credit once
    END IF;
    e := tally_post_entry(
        i.account_id, 'credit', i.amount, 0, 'auto-reload', i.intent_id::text,
        jsonb_build_object('intent_id', i.intent_id, 'charge_id', p_charge_id),
        'reload:' || i.intent_id, NULL, jsonb_build_object('type', 'auto_reload'), NULL, true);
    UPDATE reload_intents
    SET status = 'succeeded', finished_at = clock_timestamp(), entry_id = e.entry_id,
        charge_id = p_charge_id, lease_until = NULL, error = ''
    WHERE intent_id = p_intent_id
    RETURNING * INTO i;
    RETURN to_jsonb(i);
END $$;

CREATE OR REPLACE FUNCTION tally_reload_failed(
    p_intent_id uuid, p_error text, p_max_attempts integer, p_retry_seconds double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    i reload_intents;
BEGIN
    SELECT * INTO i FROM reload_intents WHERE intent_id = p_intent_id;
    PERFORM tally_lock_account(i.account_id);
    SELECT * INTO i FROM reload_intents WHERE intent_id = p_intent_id;
    IF i.status <> 'pending' THEN
        RETURN to_jsonb(i);
    END IF;
    IF i.attempts >= p_max_attempts THEN
        UPDATE reload_intents
        SET status = 'failed', finished_at = clock_timestamp(), error = p_error,
            lease_until = NULL
        WHERE intent_id = p_intent_id RETURNING * INTO i;
        UPDATE accounts
        SET auto_reload_enabled = false,
            auto_reload_disabled_reason = format(
                'turned off after %s failed funding attempts: %s', i.attempts, p_error)
        WHERE account_id = i.account_id;
    ELSE
        UPDATE reload_intents
        SET error = p_error, lease_until = NULL,
            next_attempt_at = clock_timestamp() + make_interval(secs => p_retry_seconds)
        WHERE intent_id = p_intent_id RETURNING * INTO i;
    END IF;
    RETURN to_jsonb(i);
END $$;
