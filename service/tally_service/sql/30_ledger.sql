CREATE OR REPLACE FUNCTION tally_post_entry(
    p_account_id text, p_type text, p_amount bigint, p_reserved_delta bigint,
    p_description text, p_reference text, p_metadata jsonb, p_request_id text,
    p_reservation_id uuid, p_grant jsonb, p_at timestamptz, p_draw boolean
) RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    e ledger_entries;
    v_before bigint;
    v_grant_type text;
    v_credit_type text;
    v_available_before bigint;
    v_mark text;
BEGIN
    -- Entries stay in time order even when one is backdated to an instant it caught up:
    -- the entry's time is the account's new balance_updated_at.
    UPDATE accounts
    SET balance = balance + p_amount,
        reserved = reserved + p_reserved_delta,
        last_sequence = last_sequence + 1,
        balance_updated_at = greatest(balance_updated_at, coalesce(p_at, clock_timestamp()))
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    v_before := a.balance - p_amount;
    v_available_before := v_before - (a.reserved - p_reserved_delta);
    IF p_amount < 0 AND p_draw THEN
        v_credit_type := tally_draw_grants(p_account_id, least(-p_amount, greatest(v_before, 0)));
    END IF;
    -- The UPDATE above holds the account's row lock to the commit, so the entry's
    -- account exists and stays: ledger_entries_account (migration 0017) need not look
    -- (had it found no row, the sequence would be NULL and the INSERT refused). The
    -- mark is on for this INSERT only. (An assignment, not PERFORM: a simple expression,
    -- where PERFORM runs the executor, about 3,000 against 10,000 instructions.)
    v_mark := set_config('tally.references_checked', 'on', true);
    INSERT INTO ledger_entries (
        account_id, sequence, entry_type, amount, balance_after, description,
        reference, metadata, request_id, reservation_id, created_at, credit_type
    ) VALUES (
        p_account_id, a.last_sequence, p_type, p_amount, a.balance, p_description,
        p_reference, p_metadata, p_request_id, p_reservation_id, a.balance_updated_at,
        v_credit_type
    ) RETURNING * INTO e;
    v_mark := set_config('tally.references_checked', '', true);
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
                (p_grant ->> 'expires_at')::timestamptz, e.created_at, e.entry_id,
                (p_grant ->> 'subscription_id')::uuid, (p_grant ->> 'period')::bigint);
    END IF;
    -- A credit drawn before expired credit kept under holds, or holds taken off it (a
    -- capture), leaves that credit uncovered: it is written off now (DESIGN.md 5b),
    -- before the reload rule looks at the movement as a whole.
    IF p_amount > 0 OR p_reserved_delta < 0 THEN
        IF tally_settle_expired(p_account_id, a.balance_updated_at) > 0 THEN
            SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
        END IF;
    END IF;
    IF a.auto_reload_enabled THEN
        PERFORM tally_maybe_reload(a, v_available_before);
    END IF;
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
