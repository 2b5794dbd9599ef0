-- Refusals are answers, not exceptions. A money function that refuses a request
-- (unknown account or reservation, a reused key, insufficient credit, a hold no longer
-- pending…) returns {"error": {"sqlstate", "detail"}} before it writes anything, so a
-- group of calls in one transaction (sql/90_group.sql) needs no subtransaction to keep
-- one call's refusal from undoing its neighbours. Python maps the SQLSTATE (class TA)
-- to the error catalog exactly as it maps a raised one. Exceptions remain for what
-- must abort the transaction (assertions paired with invariants, overflow).
--
-- The refusal builders below are PL/pgSQL: an SQL function that PostgreSQL cannot
-- inline (jsonb_build_object is not immutable) is parsed and planned again in every
-- transaction that calls it (design.md).
CREATE OR REPLACE FUNCTION tally_refusal(p_sqlstate text, p_detail json) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN jsonb_build_object('error', jsonb_build_object(
        'sqlstate', p_sqlstate, 'detail', p_detail::text));
END $$;

-- Raises a refusal, where the caller cannot return it (a helper returning a row).
CREATE OR REPLACE FUNCTION tally_raise(p_refusal jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refused' USING ERRCODE = p_refusal -> 'error' ->> 'sqlstate',
        DETAIL = p_refusal -> 'error' ->> 'detail';
END $$;

CREATE OR REPLACE FUNCTION tally_not_found(p_resource text, p_id text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN tally_refusal('TA404', json_build_object('resource', p_resource, 'id', p_id));
END $$;

-- The balance rule, the one place it is written: may `p_amount` more leave the account
-- (a reserve, a debit, a usage charge) without taking available credit below
-- -overdraft_limit? Credits, adjustments and expiries are not held to it.
CREATE OR REPLACE FUNCTION tally_fits(a accounts, p_amount bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT a.balance - a.reserved - p_amount >= -a.overdraft_limit
$$;

CREATE OR REPLACE FUNCTION tally_insufficient(a accounts, p_requested bigint) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN tally_refusal('TA402', json_build_object(
        'account_id', a.account_id,
        'available', a.balance - a.reserved,
        'requested', p_requested,
        'overdraft_limit', a.overdraft_limit));
END $$;
