-- Threshold alerts: one notification per crossing, written in the transaction that
-- crossed (an outbox row, like a reload intent), delivered later by the notification
-- worker. The triggers of migration 0010 call the two rules below.

-- Records one crossing and wakes the workers at commit.
CREATE OR REPLACE FUNCTION tally_record_notification(
    t thresholds, p_observed bigint, p_period_start timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO notifications (account_id, threshold_id, metric, observed, fire_at,
                               period_start)
    VALUES (t.account_id, t.threshold_id, t.metric, p_observed, t.fire_at, p_period_start)
    ON CONFLICT (threshold_id, period_start) WHERE period_start IS NOT NULL DO NOTHING
    RETURNING notification_id INTO v_id;
    IF v_id IS NOT NULL THEN
        PERFORM pg_notify('tally_notifications', v_id::text);
    END IF;
END $$;

-- Available credit fell from p_before to p_after (under the account's row lock, so
-- the movements of one account are seen one after another): each live threshold with
-- p_before >= fire_at > p_after was crossed by this movement, and only by it.
CREATE OR REPLACE FUNCTION tally_available_moved(
    p_account_id text, p_before bigint, p_after bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t thresholds;
BEGIN
    FOR t IN
        SELECT * FROM thresholds
        WHERE account_id = p_account_id AND metric = 'available_credit'
          AND deleted_at IS NULL AND p_before >= fire_at AND p_after < fire_at
        ORDER BY threshold_id
    LOOP
        PERFORM tally_record_notification(t, p_after, NULL);
    END LOOP;
END $$;

-- The current period of a usage threshold, in the account's time zone: [start, end).
CREATE OR REPLACE FUNCTION tally_threshold_period(p_period text, p_time_zone text, p_at timestamptz)
RETURNS tstzrange LANGUAGE sql STABLE AS $$
    SELECT tstzrange(
        date_trunc(p_period, p_at AT TIME ZONE p_time_zone) AT TIME ZONE p_time_zone,
        (date_trunc(p_period, p_at AT TIME ZONE p_time_zone)
         + ('1 ' || p_period)::interval) AT TIME ZONE p_time_zone)
$$;

-- Usage of an account in [p_start, p_end), from the 15-minute rollups (a local day or
-- month starts on a bucket boundary in every zone in use).
CREATE OR REPLACE FUNCTION tally_period_usage(
    p_account_id text, p_metric text, p_start timestamptz, p_end timestamptz
) RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(sum(CASE p_metric WHEN 'usage_requests' THEN requests
                                              ELSE credits END), 0)
            FROM usage_rollups
            WHERE account_id = p_account_id AND bucket_start >= p_start
              AND bucket_start < p_end);
END $$;

-- A rollup bucket of the account grew by p_requests / p_credits. For each live usage
-- threshold whose current period holds the bucket: before < fire_at <= after is a
-- crossing, recorded once per period (a unique index backs it).
CREATE OR REPLACE FUNCTION tally_usage_counted(
    p_account_id text, p_bucket_start timestamptz, p_requests bigint, p_credits bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t thresholds;
    v_zone text;
    v_period tstzrange;
    v_start timestamptz;
    v_end timestamptz;
    v_delta bigint;
    v_after bigint;
BEGIN
    FOR t IN
        SELECT * FROM thresholds
        WHERE account_id = p_account_id AND metric <> 'available_credit'
          AND deleted_at IS NULL
        ORDER BY threshold_id
        FOR UPDATE
    LOOP
        IF v_zone IS NULL THEN
            SELECT time_zone INTO v_zone FROM accounts WHERE account_id = p_account_id;
        END IF;
        v_period := tally_threshold_period(t.period, v_zone, clock_timestamp());
        v_start := lower(v_period);
        v_end := upper(v_period);
        v_delta := CASE t.metric WHEN 'usage_requests' THEN p_requests ELSE p_credits END;
        CONTINUE WHEN v_delta = 0 OR p_bucket_start < v_start OR p_bucket_start >= v_end;
        IF t.period_start IS DISTINCT FROM v_start THEN
            -- A new period: count it afresh (the rollups already hold this delta).
            v_after := tally_period_usage(p_account_id, t.metric, v_start, v_end);
        ELSE
            v_after := t.period_value + v_delta;
        END IF;
        UPDATE thresholds SET period_start = v_start, period_value = v_after
        WHERE threshold_id = t.threshold_id;
        IF v_after - v_delta < t.fire_at AND v_after >= t.fire_at THEN
            PERFORM tally_record_notification(t, v_after, v_start);
        END IF;
    END LOOP;
END $$;

-- Keeps `accounts.available_alerts` (the trigger's gate) equal to "has a live threshold
-- on available credit"; called under the account's lock.
CREATE OR REPLACE FUNCTION tally_arm_available_alerts(p_account_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET available_alerts = EXISTS (
        SELECT 1 FROM thresholds
        WHERE account_id = p_account_id AND metric = 'available_credit' AND deleted_at IS NULL)
    WHERE account_id = p_account_id;
END $$;

CREATE OR REPLACE FUNCTION tally_create_threshold(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_metric text,
    p_value bigint, p_percent integer, p_period text
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    t thresholds;
    r jsonb;
    v_period tstzrange;
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    a := tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'CreateThreshold', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    -- The triggers look at every live threshold of the account: bounded.
    IF (SELECT count(*) FROM thresholds
        WHERE account_id = p_account_id AND deleted_at IS NULL) >= 100 THEN
        RETURN tally_refusal('TA429', json_build_object(
            'account_id', p_account_id, 'limit', 100));
    END IF;
    INSERT INTO thresholds (account_id, metric, value, percent, fire_at, period, request_id)
    VALUES (p_account_id, p_metric, p_value, p_percent,
            CASE WHEN p_metric = 'available_credit' THEN p_value
                 ELSE ceil(p_value::numeric * p_percent / 100)::bigint END,
            p_period, p_request_id)
    RETURNING * INTO t;
    PERFORM tally_arm_available_alerts(p_account_id);
    -- Already past it: no crossing will come (in this period), so it fires now.
    IF p_metric = 'available_credit' THEN
        IF a.balance - a.reserved < t.fire_at THEN
            PERFORM tally_record_notification(t, a.balance - a.reserved, NULL);
        END IF;
    ELSE
        v_period := tally_threshold_period(p_period, a.time_zone, clock_timestamp());
        v_start := lower(v_period);
        v_end := upper(v_period);
        UPDATE thresholds
        SET period_start = v_start,
            period_value = tally_period_usage(p_account_id, p_metric, v_start, v_end)
        WHERE threshold_id = t.threshold_id
        RETURNING * INTO t;
        IF t.period_value >= t.fire_at THEN
            PERFORM tally_record_notification(t, t.period_value, v_start);
        END IF;
    END IF;
    RETURN tally_remember(p_request_id, 'CreateThreshold', p_fingerprint,
                          jsonb_build_object('threshold', to_jsonb(t)));
END $$;

CREATE OR REPLACE FUNCTION tally_delete_threshold(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_threshold_id uuid
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    t thresholds;
    r jsonb;
BEGIN
    PERFORM tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'DeleteThreshold', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE thresholds SET deleted_at = clock_timestamp()
    WHERE threshold_id = p_threshold_id AND account_id = p_account_id AND deleted_at IS NULL
    RETURNING * INTO t;
    IF NOT FOUND THEN
        RETURN tally_not_found('threshold', p_threshold_id::text);
    END IF;
    PERFORM tally_arm_available_alerts(p_account_id);
    RETURN tally_remember(p_request_id, 'DeleteThreshold', p_fingerprint,
                          jsonb_build_object('threshold', to_jsonb(t)));
END $$;

-- The notification worker claims a due notification for a lease; a crash lets the
-- lease lapse and it is claimed again with the same id (the hook's idempotency key).
CREATE OR REPLACE FUNCTION tally_claim_notification(p_lease_seconds integer)
RETURNS notifications LANGUAGE plpgsql AS $$
DECLARE
    n notifications;
BEGIN
    UPDATE notifications
    SET lease_until = clock_timestamp() + make_interval(secs => p_lease_seconds),
        attempts = attempts + 1
    WHERE notification_id = (
        SELECT notification_id FROM notifications
        WHERE status = 'pending' AND next_attempt_at <= clock_timestamp()
          AND (lease_until IS NULL OR lease_until < clock_timestamp())
        ORDER BY next_attempt_at LIMIT 1
        FOR UPDATE SKIP LOCKED)
    RETURNING * INTO n;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION tally_notification_delivered(p_notification_id uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE notifications
    SET status = 'delivered', delivered_at = clock_timestamp(), lease_until = NULL,
        error = ''
    WHERE notification_id = p_notification_id AND status = 'pending';
END $$;

-- A failed delivery is retried after p_retry_seconds, for as long as it takes (at least
-- once); the last error stays on the row.
CREATE OR REPLACE FUNCTION tally_notification_failed(
    p_notification_id uuid, p_error text, p_retry_seconds double precision
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE notifications
    SET error = p_error, lease_until = NULL,
        next_attempt_at = clock_timestamp() + make_interval(secs => p_retry_seconds)
    WHERE notification_id = p_notification_id AND status = 'pending';
END $$;
