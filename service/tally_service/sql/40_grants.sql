CREATE OR REPLACE FUNCTION tally_default_priority(p_type text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_type WHEN 'subscription' THEN 10 WHEN 'promotional' THEN 20 ELSE 30 END
$$;

-- A live grant is one with credit left: `NOT spent` (spent is `remaining = 0`, a stored
-- generated column, migration 0014). The indexes of grants name `spent`, never
-- `remaining`, so a draw that leaves credit in a grant is a HOT update; say `NOT spent`
-- rather than `remaining > 0` so that the planner can use them.
--
-- Draws `p_amount` from live grants in the documented order; returns the type of the
-- first grant drawn. The caller passes at most the positive part of the balance,
-- which the grants cover exactly (invariant 5); anything else is a bug.
CREATE OR REPLACE FUNCTION tally_draw_grants(p_account_id text, p_amount bigint) RETURNS text
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
        WHERE account_id = p_account_id AND NOT spent
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

-- Writes off, at once, the part of every grant past its expiry (expires_at <= p_upto)
-- that no pending hold stands on; returns the credit written off.
--
-- The pending holds together stand on the first `reserved` credits of the grants in
-- draw order (a capture would draw exactly those). An expired grant keeps the part of
-- it inside that prefix, and loses the rest: one "expired" debit per grant, dated at its
-- expiry, or at p_at when something later (a release, a hold's expiry, a capture of
-- less than the hold, a credit drawn before it) took the holds off it. Writing off the
-- part outside the prefix moves no other grant into or out of it, so every due grant is
-- settled by this one statement, however many fall due at once. What is outside the
-- prefix is at most the available credit, so an expiry never takes available credit
-- below zero (nor lower, if it already is): the promise of a pending hold (DESIGN.md 5b).
CREATE OR REPLACE FUNCTION tally_write_off(
    p_account_id text, p_upto timestamptz, p_at timestamptz
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    v_total bigint;
    v_count bigint;
    v_last timestamptz;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
    WITH ordered AS (
        SELECT grant_id, grant_type, expires_at, expired, remaining,
               coalesce(sum(remaining) OVER (
                   ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS ahead
        FROM grants WHERE account_id = p_account_id AND NOT spent
    ), due AS (
        SELECT grant_id, grant_type, expired,
               remaining - least(remaining, greatest(a.reserved - ahead, 0)) AS lost,
               greatest(expires_at, p_at) AS lost_at
        FROM ordered WHERE expires_at <= p_upto
    ), marked AS (
        UPDATE grants g SET remaining = g.remaining - d.lost, expired = true
        FROM due d WHERE g.grant_id = d.grant_id AND (d.lost > 0 OR NOT d.expired)
    ), chained AS (
        SELECT grant_id, grant_type, lost,
               greatest(a.balance_updated_at, lost_at) AS at,
               row_number() OVER w AS n,
               sum(lost) OVER w AS lost_so_far
        FROM due WHERE lost > 0
        WINDOW w AS (ORDER BY lost_at, grant_id)
    ), written AS (
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, created_at)
        SELECT p_account_id, a.last_sequence + n, 'debit', -lost, a.balance - lost_so_far,
               'expired', grant_id::text,
               jsonb_build_object('grant_id', grant_id, 'grant_type', grant_type),
               'expiry:' || grant_id, at
        FROM chained
        RETURNING amount, created_at
    )
    SELECT coalesce(-sum(amount), 0), count(*), max(created_at)
    INTO v_total, v_count, v_last FROM written;
    IF v_count > 0 THEN
        UPDATE accounts
        SET balance = balance - v_total,
            last_sequence = last_sequence + v_count,
            balance_updated_at = greatest(balance_updated_at, v_last)
        WHERE account_id = p_account_id;
    END IF;
    RETURN v_total;
END $$;

-- After the holds' cover shrank or moved (a release, a capture, a hold's expiry, a
-- credit), writes off whatever expired credit they no longer stand on, dated p_at.
CREATE OR REPLACE FUNCTION tally_settle_expired(p_account_id text, p_at timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM grants
               WHERE account_id = p_account_id AND NOT spent AND expired) THEN
        RETURN tally_write_off(p_account_id, p_at, p_at);
    END IF;
    RETURN 0;
END $$;
