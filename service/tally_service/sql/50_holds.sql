-- Expires the account's pending holds due by p_until, in one statement: they leave
-- reserved at their own instants, and the usage jobs they held fail with them.
CREATE OR REPLACE FUNCTION tally_expire_due_holds(p_account_id text, p_until timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_freed bigint;
    v_last timestamptz;
    v_ids uuid[];
    ev usage_events;
BEGIN
    WITH gone AS (
        UPDATE holds SET status = 'expired', finalized_at = expires_at
        WHERE account_id = p_account_id AND status = 'pending' AND expires_at <= p_until
        RETURNING reservation_id, amount - captured AS freed, expires_at
    )
    SELECT sum(freed), max(expires_at), array_agg(reservation_id)
    INTO v_freed, v_last, v_ids FROM gone;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    UPDATE accounts
    SET reserved = reserved - v_freed,
        balance_updated_at = greatest(balance_updated_at, v_last)
    WHERE account_id = p_account_id;
    FOR ev IN
        UPDATE usage_events e
        SET status = 'failed', success = false, message = 'EXPIRED',
            completed_at = h.expires_at
        FROM holds h
        WHERE h.reservation_id = ANY (v_ids) AND e.reservation_id = h.reservation_id
          AND e.status IN ('pending', 'processing')
        RETURNING e.*
    LOOP
        PERFORM tally_roll_up(ev);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION tally_place_hold(
    a accounts, p_amount bigint, p_ttl_seconds bigint, p_reference text, p_metadata jsonb,
    p_request_id text
) RETURNS holds LANGUAGE plpgsql AS $$
DECLARE
    h holds;
    v_available_before bigint;
BEGIN
    IF NOT tally_fits(a, p_amount) THEN
        PERFORM tally_raise(tally_insufficient(a, p_amount));
    END IF;
    INSERT INTO holds (account_id, status, amount, expires_at, reference, metadata,
                       request_id)
    VALUES (a.account_id, 'pending', p_amount,
            clock_timestamp() + make_interval(secs => p_ttl_seconds), p_reference,
            p_metadata, p_request_id)
    RETURNING * INTO h;
    v_available_before := a.balance - a.reserved;
    UPDATE accounts SET reserved = reserved + p_amount, balance_updated_at = h.created_at
    WHERE account_id = a.account_id
    RETURNING * INTO a;
    -- The reload rule on the row the update returned (no second read of it).
    IF a.auto_reload_enabled THEN
        PERFORM tally_maybe_reload(a, v_available_before);
    END IF;
    RETURN h;
END $$;

CREATE OR REPLACE FUNCTION tally_reserve(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_amount bigint,
    p_ttl_seconds bigint, p_reference text, p_metadata jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    h holds;
    r jsonb;
BEGIN
    a := tally_find_account(p_account_id);
    IF a.account_id IS NULL THEN
        RETURN tally_not_found('account', p_account_id);
    END IF;
    r := tally_replay(p_request_id, 'Reserve', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    IF NOT tally_fits(a, p_amount) THEN
        RETURN tally_insufficient(a, p_amount);
    END IF;
    h := tally_place_hold(a, p_amount, p_ttl_seconds, p_reference, p_metadata, p_request_id);
    RETURN tally_remember(p_request_id, 'Reserve', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h)));
END $$;

-- Locks the account that owns a reservation; returns the reservation as it is then
-- (a NULL row if there is no such reservation).
CREATE OR REPLACE FUNCTION tally_lock_reservation(p_reservation_id uuid) RETURNS holds
LANGUAGE plpgsql AS $$
DECLARE
    v_account_id text;
    h holds;
BEGIN
    SELECT account_id INTO v_account_id FROM holds WHERE reservation_id = p_reservation_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- The hold's account exists (a foreign key): the lock finds it.
    PERFORM tally_find_account(v_account_id);
    -- Every change of a hold happens under its account's lock, so this read is stable.
    SELECT * INTO h FROM holds WHERE reservation_id = p_reservation_id;
    RETURN h;
END $$;

-- NULL unless the hold is the reservation of a usage event still open (StartUsage); then
-- the refusal: Capture and Release leave such a hold to CompleteUsage / FailUsage. Read
-- under the account's lock, so the event's state cannot change meanwhile.
--
-- This and tally_require_pending are PL/pgSQL, not SQL: an SQL function that is not
-- inlined is parsed and planned again in every transaction that calls it from a PL/pgSQL
-- expression (the expression's state lives for the transaction), which cost a Capture
-- or Release alone in its transaction about 150-190 µs; PL/pgSQL keeps its plans for the
-- session.
CREATE OR REPLACE FUNCTION tally_refuse_usage_hold(h holds) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_event_id text;
BEGIN
    SELECT e.event_id INTO v_event_id FROM usage_events e
    WHERE e.reservation_id = h.reservation_id AND e.status IN ('pending', 'processing')
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN tally_refusal('TA423', json_build_object(
        'reservation_id', h.reservation_id, 'event_id', v_event_id));
END $$;

-- NULL if the hold is pending, else the refusal to return.
CREATE OR REPLACE FUNCTION tally_require_pending(h holds) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF h.status <> 'pending' THEN
        RETURN tally_refusal('TA412', json_build_object(
            'reservation_id', h.reservation_id, 'status', h.status));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tally_capture(
    p_request_id text, p_fingerprint bytea, p_reservation_id uuid, p_amount bigint,
    p_description text, p_metadata jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    h holds;
    e ledger_entries;
    r jsonb;
    v_amount bigint;
BEGIN
    h := tally_lock_reservation(p_reservation_id);
    IF h.reservation_id IS NULL THEN
        RETURN tally_not_found('reservation', p_reservation_id::text);
    END IF;
    r := coalesce(tally_replay(p_request_id, 'Capture', p_fingerprint),
                  tally_refuse_usage_hold(h), tally_require_pending(h));
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    v_amount := coalesce(p_amount, h.amount);
    IF v_amount > h.amount THEN
        RETURN tally_refusal('TA422', json_build_object('held', h.amount,
                                                        'requested', v_amount));
    END IF;
    UPDATE holds SET status = 'captured', captured = v_amount,
                     finalized_at = clock_timestamp()
    WHERE reservation_id = p_reservation_id
    RETURNING * INTO h;
    -- The whole hold leaves reserved; only the captured part leaves the balance.
    e := tally_post_entry(h.account_id, 'debit', -v_amount, -h.amount, p_description,
                          h.reference, h.metadata || p_metadata, p_request_id,
                          p_reservation_id, NULL, NULL, true);
    RETURN tally_remember(p_request_id, 'Capture', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h),
                                             'entry', to_jsonb(e)));
END $$;

CREATE OR REPLACE FUNCTION tally_release(
    p_request_id text, p_fingerprint bytea, p_reservation_id uuid
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    h holds;
    r jsonb;
BEGIN
    h := tally_lock_reservation(p_reservation_id);
    IF h.reservation_id IS NULL THEN
        RETURN tally_not_found('reservation', p_reservation_id::text);
    END IF;
    r := coalesce(tally_replay(p_request_id, 'Release', p_fingerprint),
                  tally_refuse_usage_hold(h), tally_require_pending(h));
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE holds SET status = 'released', finalized_at = clock_timestamp()
    WHERE reservation_id = p_reservation_id
    RETURNING * INTO h;
    UPDATE accounts SET reserved = reserved - h.amount, balance_updated_at = h.finalized_at
    WHERE account_id = h.account_id;
    -- Expired credit the hold stood on is written off now (DESIGN.md 5b).
    PERFORM tally_settle_expired(h.account_id, h.finalized_at);
    RETURN tally_remember(p_request_id, 'Release', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h)));
END $$;
