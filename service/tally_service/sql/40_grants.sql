CREATE OR REPLACE FUNCTION tally_default_priority(p_type text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_type WHEN 'subscription' THEN 10 WHEN 'promotional' THEN 20 ELSE 30 END
$$;

-- A live grant is one with credit left: `NOT spent` (spent is `remaining = 0`, a stored
-- generated column, migration 0014). The indexes of grants name `spent`, never
-- `remaining`, so a draw that leaves credit in a grant is a HOT update; say `NOT spent`
-- rather than `remaining > 0` so that the planner can use them.
--
-- The one draw of Tally: takes p_draws[k] from the live grants of p_account_ids[k]
-- (each account once), in the documented order (priority, soonest expiry, oldest,
-- grant_id), for one movement or a whole group, by one statement. Returns the grants it
-- drew from, each with the credit ahead of it in its account's draw and what it held
-- before: the grant holding a given credit of an account's draw (an entry's
-- credit_type, the type of the grant its first credit comes from) is the one whose
-- range [ahead, ahead + remaining) holds it. The callers pass at most the positive part
-- of each balance, which the grants cover exactly (invariant 5); anything else is a bug.
CREATE OR REPLACE FUNCTION tally_draw(p_account_ids text[], p_draws bigint[])
RETURNS TABLE (account_id text, ahead bigint, remaining bigint, grant_type text)
LANGUAGE plpgsql
-- A plan made once per session (each account's grants by one index scan, whatever the
-- size of the arrays).
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_accounts text[];
    v_aheads bigint[];
    v_remainings bigint[];
    v_types text[];
    v_taken bigint;
BEGIN
    WITH drawn AS (
        UPDATE grants t SET remaining = t.remaining - l.taken
        FROM (SELECT n.account_id, g.grant_id, g.grant_type, g.remaining, g.ahead,
                     least(g.remaining, n.draw - g.ahead) AS taken
              FROM unnest(p_account_ids, p_draws) AS n (account_id, draw),
              LATERAL (SELECT x.grant_id, x.grant_type, x.remaining,
                              (sum(x.remaining) OVER w - x.remaining)::bigint AS ahead
                       FROM grants x
                       WHERE x.account_id = n.account_id AND NOT x.spent
                       WINDOW w AS (ORDER BY x.priority, x.expires_at NULLS LAST,
                                             x.created_at, x.grant_id)) g
              WHERE n.draw > 0 AND g.ahead < n.draw) l
        WHERE t.grant_id = l.grant_id
        RETURNING l.account_id, l.ahead, l.remaining, l.grant_type, l.taken
    )
    SELECT array_agg(d.account_id), array_agg(d.ahead), array_agg(d.remaining),
           array_agg(d.grant_type), coalesce(sum(d.taken), 0)
    INTO v_accounts, v_aheads, v_remainings, v_types, v_taken
    FROM drawn d;
    -- Each account's draw takes at most its own, so the totals are equal only when
    -- every account's grants covered it.
    IF v_taken <> (SELECT coalesce(sum(greatest(u.draw, 0)), 0)
                   FROM unnest(p_draws) AS u (draw)) THEN
        RAISE EXCEPTION 'grants of % do not cover their balances', p_account_ids
            USING ERRCODE = 'TA901';
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_accounts, v_aheads, v_remainings, v_types);
END $$;

-- Draws `p_amount` of one account (tally_draw); returns the type of the first grant
-- drawn.
CREATE OR REPLACE FUNCTION tally_draw_grants(p_account_id text, p_amount bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_first text;
BEGIN
    SELECT d.grant_type INTO v_first
    FROM tally_draw(ARRAY[p_account_id], ARRAY[p_amount]) d WHERE d.ahead = 0;
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
    v_mark text;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id;
    -- Every caller holds the account's row lock (tally_find_account, or an UPDATE of
    -- the account before it): ledger_entries_account (migration 0017) need not look.
    v_mark := set_config('tally.references_checked', 'on', true);
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
    v_mark := set_config('tally.references_checked', '', true);
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
