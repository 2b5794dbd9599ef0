"""Credit grants (priority and expiry), subscriptions, and auto-reload intents.

Every credit creates a grant and every debit draws grants in a fixed order, so that
DESIGN.md invariant 5 holds: the unspent remainders sum to max(balance, 0). Expiries
and subscription renewals are written under the account lock at their own instants
(the lock catches up on whatever fell due, in time order), so a grant stops counting
at its expiry whether or not the sweeper has run. The auto-reload decision is taken in
the transaction that lowers available credit, as one outbox row (a reload intent);
a partial unique index keeps at most one intent in flight per account.

Revision ID: 0003
Revises: 0002
"""

from tally_service.migrations.script import run_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = r"""
ALTER TABLE accounts
    ADD COLUMN auto_reload_max_per_day integer NOT NULL DEFAULT 0
        CHECK (auto_reload_max_per_day >= 0),
    ADD COLUMN auto_reload_max_per_month bigint NOT NULL DEFAULT 0
        CHECK (auto_reload_max_per_month >= 0),
    ADD COLUMN auto_reload_disabled_reason text NOT NULL DEFAULT '',
    ADD COLUMN subscription_renews_at timestamptz;

ALTER TABLE ledger_entries ADD COLUMN credit_type text;

CREATE TABLE subscriptions (
    account_id         text PRIMARY KEY REFERENCES accounts (account_id),
    subscription_id    uuid NOT NULL DEFAULT gen_random_uuid(),
    plan               text NOT NULL,
    credits_per_period bigint NOT NULL CHECK (credits_per_period > 0),
    period             text NOT NULL CHECK (period IN ('monthly', 'yearly')),
    anchor_at          timestamptz NOT NULL,
    rollover           boolean NOT NULL DEFAULT false,
    periods_granted    bigint NOT NULL DEFAULT 0,
    period_started_at  timestamptz,
    renews_at          timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE grants (
    grant_id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id          text NOT NULL REFERENCES accounts (account_id),
    grant_type          text NOT NULL
        CHECK (grant_type IN ('purchased', 'subscription', 'promotional', 'auto_reload')),
    amount              bigint NOT NULL CHECK (amount > 0),
    remaining           bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    priority            integer NOT NULL CHECK (priority BETWEEN 0 AND 1000),
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL,
    entry_id            bigint NOT NULL REFERENCES ledger_entries (entry_id),
    expired             boolean NOT NULL DEFAULT false,
    subscription_id     uuid,
    subscription_period bigint,
    UNIQUE (subscription_id, subscription_period)
);
-- The draw order, over live grants only.
CREATE INDEX grants_draw_order ON grants (account_id, priority, expires_at, created_at)
    WHERE remaining > 0;
CREATE INDEX grants_expiring ON grants (expires_at)
    WHERE remaining > 0 AND expires_at IS NOT NULL;

CREATE TABLE reload_intents (
    intent_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id      text NOT NULL REFERENCES accounts (account_id),
    status          text NOT NULL
        CHECK (status IN ('pending', 'succeeded', 'failed', 'skipped')),
    amount          bigint NOT NULL CHECK (amount > 0),
    attempts        integer NOT NULL DEFAULT 0,
    error           text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until     timestamptz,
    entry_id        bigint REFERENCES ledger_entries (entry_id),
    charge_id       text NOT NULL DEFAULT ''
);
-- At most one reload in flight per account, whatever the code does.
CREATE UNIQUE INDEX reload_intents_one_pending ON reload_intents (account_id)
    WHERE status = 'pending';
CREATE INDEX reload_intents_due ON reload_intents (next_attempt_at) WHERE status = 'pending';
CREATE INDEX reload_intents_by_account ON reload_intents (account_id, created_at DESC);

-- Existing positive balances become purchased grants of the account's last entry.
INSERT INTO grants (account_id, grant_type, amount, remaining, priority, created_at, entry_id)
SELECT a.account_id, 'purchased', a.balance, a.balance, 30, clock_timestamp(),
       (SELECT max(entry_id) FROM ledger_entries l WHERE l.account_id = a.account_id)
FROM accounts a WHERE a.balance > 0;

-- A usage event is paid by the credit type its debit entry drew.
CREATE FUNCTION tally_event_credit_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.entry_id IS NOT NULL THEN
        SELECT CASE WHEN credit_type = 'subscription' THEN 'subscription' ELSE 'purchased' END
        INTO NEW.credit_type FROM ledger_entries WHERE entry_id = NEW.entry_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER usage_events_credit_type BEFORE INSERT OR UPDATE OF entry_id ON usage_events
    FOR EACH ROW EXECUTE FUNCTION tally_event_credit_type();

CREATE FUNCTION tally_default_priority(p_type text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_type WHEN 'subscription' THEN 10 WHEN 'promotional' THEN 20 ELSE 30 END
$$;

-- Draws `p_amount` from live grants in the documented order; returns the type of the
-- first grant drawn. The caller passes at most the positive part of the balance,
-- which the grants cover exactly (invariant 5); anything else is a bug.
CREATE FUNCTION tally_draw_grants(p_account_id text, p_amount bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    g record;
    v_left bigint := p_amount;
    v_take bigint;
    v_first text;
BEGIN
    IF v_left <= 0 THEN
        RETURN NULL;
    END IF;
    FOR g IN
        SELECT grant_id, remaining, grant_type FROM grants
        WHERE account_id = p_account_id AND remaining > 0
        ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
    LOOP
        v_take := least(v_left, g.remaining);
        UPDATE grants SET remaining = remaining - v_take WHERE grant_id = g.grant_id;
        v_first := coalesce(v_first, g.grant_type);
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'grants of % do not cover its balance', p_account_id
            USING ERRCODE = 'TA901';
    END IF;
    RETURN v_first;
END $$;

-- Writes a reload intent if none is in flight: PENDING, or SKIPPED past a cap.
CREATE FUNCTION tally_decide_reload(a accounts) RETURNS void LANGUAGE plpgsql AS $$
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

-- Fires when available credit crosses below the threshold: from at or above it to
-- below it. Staying below does not fire again.
CREATE FUNCTION tally_check_reload(p_account_id text, p_available_before bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
    IF a.auto_reload_enabled AND p_available_before >= a.auto_reload_threshold
       AND a.balance - a.reserved < a.auto_reload_threshold THEN
        PERFORM tally_decide_reload(a);
    END IF;
END $$;

-- Appends one ledger entry to a locked account, moves its balance (and reserved
-- credit), creates the grant of a credit or draws grants for a debit, and takes the
-- auto-reload decision. `p_at` backdates the entry to the instant of an expiry or a
-- renewal caught up under the lock.
CREATE FUNCTION tally_post_entry(
    p_account_id text, p_type text, p_amount bigint, p_reserved_delta bigint,
    p_description text, p_reference text, p_metadata jsonb, p_request_id text,
    p_reservation_id uuid, p_grant jsonb, p_at timestamptz, p_draw boolean
) RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    e ledger_entries;
    v_at timestamptz;
    v_last timestamptz;
    v_before bigint;
    v_available_before bigint;
    v_grant_type text;
    v_credit_type text;
BEGIN
    SELECT balance, balance - reserved, balance_updated_at
    INTO v_before, v_available_before, v_last
    FROM accounts WHERE account_id = p_account_id;
    -- Entries stay in time order even when one is backdated to an instant it caught up.
    v_at := greatest(coalesce(p_at, clock_timestamp()), v_last);
    IF p_amount < 0 AND p_draw THEN
        v_credit_type := tally_draw_grants(p_account_id, least(-p_amount, greatest(v_before, 0)));
    END IF;
    UPDATE accounts
    SET balance = balance + p_amount,
        reserved = reserved + p_reserved_delta,
        last_sequence = last_sequence + 1,
        balance_updated_at = greatest(balance_updated_at, v_at)
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    INSERT INTO ledger_entries (
        account_id, sequence, entry_type, amount, balance_after, description,
        reference, metadata, request_id, reservation_id, created_at, credit_type
    ) VALUES (
        p_account_id, a.last_sequence, p_type, p_amount, a.balance, p_description,
        p_reference, p_metadata, p_request_id, p_reservation_id, v_at, v_credit_type
    ) RETURNING * INTO e;
    IF p_amount > 0 THEN
        v_grant_type := coalesce(p_grant ->> 'type',
                                 CASE p_type WHEN 'adjustment' THEN 'promotional'
                                             ELSE 'purchased' END);
        -- A credit first repays any debt; only the rest is spendable.
        INSERT INTO grants (account_id, grant_type, amount, remaining, priority, expires_at,
                            created_at, entry_id, subscription_id, subscription_period)
        VALUES (p_account_id, v_grant_type, p_amount,
                greatest(a.balance, 0) - greatest(v_before, 0),
                coalesce((p_grant ->> 'priority')::integer,
                         tally_default_priority(v_grant_type)),
                (p_grant ->> 'expires_at')::timestamptz, v_at, e.entry_id,
                (p_grant ->> 'subscription_id')::uuid, (p_grant ->> 'period')::bigint);
    END IF;
    PERFORM tally_check_reload(p_account_id, v_available_before);
    RETURN e;
END $$;

CREATE OR REPLACE FUNCTION tally_post(
    p_account_id text, p_type text, p_amount bigint, p_reserved_delta bigint,
    p_description text, p_reference text, p_metadata jsonb, p_request_id text,
    p_reservation_id uuid
) RETURNS ledger_entries LANGUAGE plpgsql AS $$
BEGIN
    RETURN tally_post_entry(p_account_id, p_type, p_amount, p_reserved_delta,
                            p_description, p_reference, p_metadata, p_request_id,
                            p_reservation_id, NULL, NULL, true);
END $$;

-- The start of period `p_index` of a subscription, counted from its anchor in the
-- account's time zone (so the 31st becomes each month's last day, without drift).
CREATE FUNCTION tally_period_start(s subscriptions, p_index bigint, p_zone text)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT ((s.anchor_at AT TIME ZONE p_zone)
            + make_interval(months => (p_index * CASE s.period WHEN 'monthly' THEN 1
                                                               ELSE 12 END)::integer))
           AT TIME ZONE p_zone
$$;

-- Credits one subscription period at its start instant.
CREATE FUNCTION tally_renew_subscription(a accounts) RETURNS void LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION tally_place_hold(
    a accounts, p_amount bigint, p_ttl_seconds bigint, p_reference text, p_metadata jsonb,
    p_request_id text
) RETURNS holds LANGUAGE plpgsql AS $$
DECLARE
    h holds;
BEGIN
    IF a.balance - a.reserved - p_amount < -a.overdraft_limit THEN
        PERFORM tally_insufficient(a, p_amount);
    END IF;
    INSERT INTO holds (account_id, status, amount, expires_at, reference, metadata,
                       request_id)
    VALUES (a.account_id, 'pending', p_amount,
            clock_timestamp() + make_interval(secs => p_ttl_seconds), p_reference,
            p_metadata, p_request_id)
    RETURNING * INTO h;
    UPDATE accounts SET reserved = reserved + p_amount, balance_updated_at = h.created_at
    WHERE account_id = a.account_id;
    PERFORM tally_check_reload(a.account_id, a.balance - a.reserved);
    RETURN h;
END $$;

DROP FUNCTION tally_move(text, bytea, text, text, text, bigint, text, text, jsonb);

-- Debit, top-up and adjustment: one entry, no hold. Only a debit is held to the
-- balance rule; credits and adjustments may move available credit anywhere.
CREATE FUNCTION tally_move(
    p_request_id text, p_fingerprint bytea, p_method text, p_account_id text,
    p_type text, p_amount bigint, p_description text, p_reference text,
    p_metadata jsonb, p_grant jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    e ledger_entries;
    r jsonb;
BEGIN
    a := tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, p_method, p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    IF p_type = 'debit' AND a.balance - a.reserved + p_amount < -a.overdraft_limit THEN
        PERFORM tally_insufficient(a, -p_amount);
    END IF;
    e := tally_post_entry(p_account_id, p_type, p_amount, 0, p_description, p_reference,
                          p_metadata, p_request_id, NULL, p_grant, NULL, true);
    RETURN tally_remember(p_request_id, p_method, p_fingerprint,
                          jsonb_build_object('entry', to_jsonb(e)));
END $$;

CREATE FUNCTION tally_set_auto_reload(
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

CREATE FUNCTION tally_set_subscription(
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

-- The worker claims a due intent for a lease; a crash lets the lease lapse and the
-- intent is claimed again with the same id (the funding hook's idempotency key).
CREATE FUNCTION tally_claim_reload(p_lease_seconds integer) RETURNS reload_intents
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

CREATE FUNCTION tally_reload_succeeded(p_intent_id uuid, p_charge_id text) RETURNS jsonb
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

CREATE FUNCTION tally_reload_failed(
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
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    raise NotImplementedError("0003 cannot be downgraded: grants carry ledger meaning")
