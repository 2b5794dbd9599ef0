-- The start of period `p_index` of a subscription, counted from its anchor in the
-- account's time zone (so the 31st becomes each month's last day, without drift).
CREATE OR REPLACE FUNCTION tally_period_start(s subscriptions, p_index bigint, p_zone text)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT ((s.anchor_at AT TIME ZONE p_zone)
            + make_interval(months => (p_index * CASE s.period WHEN 'monthly' THEN 1
                                                               ELSE 12 END)::integer))
           AT TIME ZONE p_zone
$$;

-- Credits one subscription period at its start instant.
CREATE OR REPLACE FUNCTION tally_renew_subscription(a accounts) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s subscriptions;
    v_end timestamptz;
BEGIN
    SELECT * INTO s FROM subscriptions WHERE account_id = a.account_id;
    v_end := tally_period_start(s, s.periods_granted + 1, a.time_zone);
    PERFORM tally_post_entry(
        a.account_id, 'credit', s.credits_per_period, 0, 'subscription ' || s.plan, s.plan,
        jsonb_build_object('plan', s.plan, 'period', s.periods_granted),
        'subscription:' || s.subscription_id || ':' || s.periods_granted, NULL,
        jsonb_build_object('type', 'subscription',
                           'expires_at', CASE WHEN s.rollover THEN NULL ELSE v_end END,
                           'subscription_id', s.subscription_id,
                           'period', s.periods_granted),
        s.renews_at, true);
    UPDATE subscriptions
    SET periods_granted = periods_granted + 1, period_started_at = renews_at, renews_at = v_end
    WHERE account_id = a.account_id;
    UPDATE accounts SET subscription_renews_at = v_end WHERE account_id = a.account_id;
END $$;

CREATE OR REPLACE FUNCTION tally_set_subscription(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_plan text,
    p_credits bigint, p_period text, p_anchor timestamptz, p_rollover boolean
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    s subscriptions;
    r jsonb;
    v_index bigint := 0;
BEGIN
    a := tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'SetSubscription', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    DELETE FROM subscriptions WHERE account_id = p_account_id;
    UPDATE accounts SET subscription_renews_at = NULL WHERE account_id = p_account_id;
    IF p_plan = '' THEN
        RETURN tally_remember(p_request_id, 'SetSubscription', p_fingerprint,
                              jsonb_build_object('subscription', NULL));
    END IF;
    INSERT INTO subscriptions (account_id, plan, credits_per_period, period, anchor_at,
                               rollover, renews_at)
    VALUES (p_account_id, p_plan, p_credits, p_period, p_anchor, p_rollover, p_anchor)
    RETURNING * INTO s;
    -- Start with the period that holds now (earlier periods are not granted).
    WHILE tally_period_start(s, v_index + 1, a.time_zone) <= clock_timestamp()
          AND v_index < 1200 LOOP
        v_index := v_index + 1;
    END LOOP;
    UPDATE subscriptions
    SET periods_granted = v_index, renews_at = tally_period_start(s, v_index, a.time_zone)
    WHERE account_id = p_account_id
    RETURNING * INTO s;
    UPDATE accounts SET subscription_renews_at = s.renews_at WHERE account_id = p_account_id;
    PERFORM tally_lock_account(p_account_id);  -- grants the current period if it began
    SELECT * INTO s FROM subscriptions WHERE account_id = p_account_id;
    RETURN tally_remember(p_request_id, 'SetSubscription', p_fingerprint,
                          jsonb_build_object('subscription', to_jsonb(s)));
END $$;
