-- The lock now also catches up on grant expiries and subscription renewals that fell
-- due, in time order (an expiry before a renewal at the same instant), a bounded
-- number per call.
CREATE OR REPLACE FUNCTION tally_lock_account(p_account_id text) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    h holds;
    g grants;
    ev usage_events;
    v_expired bigint := 0;
    v_last_expiry timestamptz;
    v_now timestamptz;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    v_now := clock_timestamp();
    FOR h IN
        UPDATE holds SET status = 'expired', finalized_at = expires_at
        WHERE account_id = p_account_id AND status = 'pending' AND expires_at <= v_now
        RETURNING *
    LOOP
        v_expired := v_expired + h.amount - h.captured;
        v_last_expiry := greatest(v_last_expiry, h.expires_at);
        FOR ev IN
            UPDATE usage_events
            SET status = 'failed', success = false, message = 'EXPIRED',
                completed_at = h.expires_at
            WHERE reservation_id = h.reservation_id AND status IN ('pending', 'processing')
            RETURNING *
        LOOP
            PERFORM tally_roll_up(ev);
        END LOOP;
    END LOOP;
    IF v_expired > 0 THEN
        UPDATE accounts
        SET reserved = reserved - v_expired,
            balance_updated_at = greatest(balance_updated_at, v_last_expiry)
        WHERE account_id = p_account_id;
    END IF;
    FOR i IN 1..100 LOOP
        SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
        SELECT * INTO g FROM grants
        WHERE account_id = p_account_id AND remaining > 0 AND expires_at <= v_now
        ORDER BY expires_at, grant_id LIMIT 1;
        IF g.grant_id IS NOT NULL
           AND (a.subscription_renews_at IS NULL OR a.subscription_renews_at > v_now
                OR g.expires_at <= a.subscription_renews_at) THEN
            PERFORM tally_post_entry(
                p_account_id, 'debit', -g.remaining, 0, 'expired', g.grant_id::text,
                jsonb_build_object('grant_id', g.grant_id, 'grant_type', g.grant_type),
                'expiry:' || g.grant_id, NULL, NULL, g.expires_at, false);
            UPDATE grants SET remaining = 0, expired = true WHERE grant_id = g.grant_id;
        ELSIF a.subscription_renews_at <= v_now THEN
            PERFORM tally_renew_subscription(a);
        ELSE
            EXIT;
        END IF;
    END LOOP;
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
    RETURN a;
END $$;

-- The sweeper's unit of work: expires one account's overdue holds under its lock.
CREATE OR REPLACE FUNCTION tally_expire_holds(p_account_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tally_lock_account(p_account_id);
END $$;

CREATE OR REPLACE FUNCTION tally_create_account(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_email text,
    p_name text, p_time_zone text, p_currency text, p_overdraft_limit bigint,
    p_trial_ends_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r jsonb;
BEGIN
    r := tally_replay(p_request_id, 'CreateAccount', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    INSERT INTO accounts (
        account_id, email, name, time_zone, currency, overdraft_limit, trial_ends_at
    ) VALUES (
        p_account_id, p_email, p_name, p_time_zone, p_currency, p_overdraft_limit,
        p_trial_ends_at
    ) ON CONFLICT (account_id) DO NOTHING
    RETURNING * INTO a;
    IF NOT FOUND THEN
        -- A concurrent retry of this very request may have just committed it.
        r := tally_replay(p_request_id, 'CreateAccount', p_fingerprint);
        IF r IS NOT NULL THEN
            RETURN r;
        END IF;
        RAISE EXCEPTION 'account exists' USING ERRCODE = 'TA410',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    RETURN tally_remember(p_request_id, 'CreateAccount', p_fingerprint,
                          jsonb_build_object('account', to_jsonb(a)));
END $$;

CREATE OR REPLACE FUNCTION tally_update_account(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_mask text[],
    p_email text, p_name text, p_time_zone text, p_overdraft_limit bigint,
    p_trial_ends_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r jsonb;
BEGIN
    PERFORM tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'UpdateAccount', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE accounts SET
        email = CASE WHEN 'email' = ANY (p_mask) THEN p_email ELSE email END,
        name = CASE WHEN 'name' = ANY (p_mask) THEN p_name ELSE name END,
        time_zone = CASE WHEN 'time_zone' = ANY (p_mask) THEN p_time_zone ELSE time_zone END,
        overdraft_limit = CASE WHEN 'overdraft_limit' = ANY (p_mask)
                               THEN p_overdraft_limit ELSE overdraft_limit END,
        trial_ends_at = CASE WHEN 'trial_end_time' = ANY (p_mask)
                             THEN p_trial_ends_at ELSE trial_ends_at END,
        updated_at = clock_timestamp()
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    RETURN tally_remember(p_request_id, 'UpdateAccount', p_fingerprint,
                          jsonb_build_object('account', to_jsonb(a)));
END $$;

CREATE OR REPLACE FUNCTION tally_balance(p_account_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_renews_at timestamptz;
    r jsonb;
BEGIN
    SELECT subscription_renews_at INTO v_renews_at FROM accounts
    WHERE account_id = p_account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    IF v_renews_at <= v_now
       OR EXISTS (SELECT 1 FROM holds WHERE account_id = p_account_id
                  AND status = 'pending' AND expires_at <= v_now)
       OR EXISTS (SELECT 1 FROM grants WHERE account_id = p_account_id
                  AND remaining > 0 AND expires_at <= v_now) THEN
        PERFORM tally_lock_account(p_account_id);
    END IF;
    SELECT jsonb_build_object(
        'account', to_jsonb(a),
        'subscription_credits', coalesce(sum(g.remaining) FILTER (
            WHERE g.grant_type = 'subscription'), 0),
        'purchased_credits', coalesce(sum(g.remaining) FILTER (
            WHERE g.grant_type <> 'subscription'), 0))
    INTO r
    FROM accounts a
    LEFT JOIN grants g ON g.account_id = a.account_id AND g.remaining > 0
    WHERE a.account_id = p_account_id
    GROUP BY a.*;
    RETURN jsonb_build_object('replayed', false, 'response', r);
END $$;
