CREATE OR REPLACE FUNCTION tally_default_priority(p_type text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_type WHEN 'subscription' THEN 10 WHEN 'promotional' THEN 20 ELSE 30 END
$$;

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
