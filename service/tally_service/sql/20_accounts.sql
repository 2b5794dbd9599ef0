-- Takes the account's row lock and, under it, catches up on everything that fell due
-- by now, in time order: hold expiries, grant expiries and subscription renewals (at
-- one instant: holds, then grants, then the renewal). Each step settles a whole set at
-- once, and the loop runs until nothing is due, however much is: no expired grant is
-- left spendable (DESIGN.md 5). Grant expiries between two hold expiries or renewals
-- are one step (they do not change what the holds stand on); hold expiries are one
-- step too, unless expired credit is kept under holds, which each of them may release.
-- tally_find_account returns a NULL row when the account does not exist (accounts are
-- never deleted, so the answer cannot go stale); tally_lock_account raises then.
CREATE OR REPLACE FUNCTION tally_find_account(p_account_id text) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    v_now timestamptz;
    v_hold_at timestamptz;
    v_grant_at timestamptz;
    v_renew_at timestamptz;
    v_available bigint;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_now := clock_timestamp();
    LOOP
        -- Both due instants in one statement (one executor run per movement, not two).
        SELECT (SELECT min(expires_at) FROM holds
                WHERE account_id = p_account_id AND status = 'pending'
                  AND expires_at <= v_now),
               (SELECT min(expires_at) FROM grants
                WHERE account_id = p_account_id AND NOT spent AND NOT expired
                  AND expires_at <= v_now)
        INTO v_hold_at, v_grant_at;
        v_renew_at := CASE WHEN a.subscription_renews_at <= v_now
                           THEN a.subscription_renews_at END;
        EXIT WHEN v_hold_at IS NULL AND v_grant_at IS NULL AND v_renew_at IS NULL;
        IF v_hold_at <= coalesce(least(v_grant_at, v_renew_at), 'infinity') THEN
            IF EXISTS (SELECT 1 FROM grants
                       WHERE account_id = p_account_id AND NOT spent AND expired) THEN
                -- Expired credit kept under holds: this instant's holds may release it.
                PERFORM tally_expire_due_holds(p_account_id, v_hold_at);
                PERFORM tally_write_off(p_account_id, v_hold_at, v_hold_at);
            ELSE
                PERFORM tally_expire_due_holds(
                    p_account_id, coalesce(least(v_grant_at, v_renew_at), v_now));
            END IF;
        ELSIF v_grant_at <= coalesce(v_renew_at, 'infinity') THEN
            -- Every grant expiring before the next hold expiry (or up to the renewal).
            v_available := a.balance - a.reserved;
            IF tally_write_off(p_account_id,
                               least(v_renew_at, v_now, v_hold_at - interval '1 microsecond'),
                               NULL) > 0 THEN
                SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
                PERFORM tally_maybe_reload(a, v_available);
            END IF;
        ELSE
            PERFORM tally_renew_subscription(a);
        END IF;
        SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
    END LOOP;
    RETURN a;
END $$;

CREATE OR REPLACE FUNCTION tally_lock_account(p_account_id text) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    a := tally_find_account(p_account_id);
    IF a.account_id IS NULL THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    RETURN a;
END $$;

-- The sweeper's unit of work: expires one account's overdue holds under its lock.
CREATE OR REPLACE FUNCTION tally_expire_holds(p_account_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tally_lock_account(p_account_id);
END $$;

-- A refusal (TA400, the time_zone field) unless PostgreSQL knows p_time_zone: it computes
-- the account's local days, periods and reports in that zone. Python's zoneinfo, which
-- validation.time_zone asks first, loads names that PostgreSQL's time zone data may not
-- have (a zone newer than it, or host files such as "posixrules"); an account holding
-- one would fail every later call that needs its local time. NULL when it is known.
CREATE OR REPLACE FUNCTION tally_unknown_time_zone(p_time_zone text) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM now() AT TIME ZONE p_time_zone;
    RETURN NULL;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN tally_refusal('TA400', json_build_object(
        'field', 'time_zone',
        'reason', format('%s is not a time zone the database knows', p_time_zone)));
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
    r := coalesce(tally_replay(p_request_id, 'CreateAccount', p_fingerprint),
                  tally_unknown_time_zone(p_time_zone));
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
    BEGIN
        PERFORM tally_lock_account(p_account_id);
    EXCEPTION WHEN invalid_parameter_value THEN
        -- The catch-up could not compute a local day: the stored zone is one the
        -- database does not know (accepted before such names were refused). An update
        -- that gives a known zone, under a request id not used before, repairs it
        -- first; anything else fails as before (ACCOUNT_TIME_ZONE_UNKNOWN).
        IF NOT 'time_zone' = ANY (p_mask) OR tally_unknown_time_zone(p_time_zone) IS NOT NULL
           OR tally_replay(p_request_id, 'UpdateAccount', p_fingerprint) IS NOT NULL THEN
            RAISE;
        END IF;
        UPDATE accounts SET time_zone = p_time_zone WHERE account_id = p_account_id;
        PERFORM tally_lock_account(p_account_id);
    END;
    r := tally_replay(p_request_id, 'UpdateAccount', p_fingerprint);
    IF r IS NULL AND 'time_zone' = ANY (p_mask) THEN
        r := tally_unknown_time_zone(p_time_zone);
    END IF;
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

-- The accounts among p_ids with something due at p_now (a renewal, a pending hold or a
-- live grant past its instant): the test that decides whether a writer or a read must
-- catch up (tally_find_account) before it uses the row. One index probe per account and
-- table (a set, so a group asks once; SQL, so the caller's plan holds it).
CREATE OR REPLACE FUNCTION tally_due_accounts(p_ids text[], p_now timestamptz)
RETURNS SETOF text LANGUAGE sql STABLE AS $$
    SELECT account_id FROM accounts
    WHERE account_id = ANY (p_ids) AND subscription_renews_at <= p_now
    UNION
    SELECT account_id FROM holds
    WHERE account_id = ANY (p_ids) AND status = 'pending' AND expires_at <= p_now
    UNION
    SELECT account_id FROM grants
    WHERE account_id = ANY (p_ids) AND NOT spent AND NOT expired AND expires_at <= p_now
$$;

CREATE OR REPLACE FUNCTION tally_balance(p_account_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_row accounts;
    r jsonb;
BEGIN
    SELECT * INTO v_row FROM accounts WHERE account_id = p_account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    IF EXISTS (SELECT 1 FROM tally_due_accounts(ARRAY[p_account_id], v_now)) THEN
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
    LEFT JOIN grants g ON g.account_id = a.account_id AND NOT g.spent
    WHERE a.account_id = p_account_id
    GROUP BY a.*;
    RETURN jsonb_build_object('replayed', false, 'response', r);
END $$;
