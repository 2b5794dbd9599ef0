"""Core schema: accounts, holds, the append-only ledger, idempotency keys, and the
server-side functions that move money.

Each money movement is one call of one PL/pgSQL function, so it costs one round trip
and holds the account's row lock only for the function's own work plus the commit.
Every function follows the same order: lock the account row (which also expires the
account's overdue holds), check the idempotency key, check the balance rule, write,
remember the response under the key. Errors are raised with SQLSTATEs of class
``TA`` that ``tally_service.db`` maps to domain errors.

Revision ID: 0001
"""

from tally_service.migrations.script import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TABLE accounts (
    account_id            text PRIMARY KEY,
    email                 text NOT NULL DEFAULT '',
    name                  text NOT NULL DEFAULT '',
    time_zone             text NOT NULL DEFAULT 'UTC',
    currency              text NOT NULL DEFAULT 'CREDIT',
    overdraft_limit       bigint NOT NULL DEFAULT 0 CHECK (overdraft_limit >= 0),
    trial_ends_at         timestamptz,
    balance               bigint NOT NULL DEFAULT 0,
    reserved              bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    last_sequence         bigint NOT NULL DEFAULT 0 CHECK (last_sequence >= 0),
    auto_reload_enabled   boolean NOT NULL DEFAULT false,
    auto_reload_threshold bigint NOT NULL DEFAULT 0,
    auto_reload_amount    bigint NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    balance_updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE holds (
    reservation_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id     text NOT NULL REFERENCES accounts (account_id),
    status         text NOT NULL
                   CHECK (status IN ('pending', 'captured', 'released', 'expired')),
    amount         bigint NOT NULL CHECK (amount > 0),
    captured       bigint NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
    expires_at     timestamptz NOT NULL,
    reference      text NOT NULL DEFAULT '',
    metadata       jsonb NOT NULL DEFAULT '{}',
    request_id     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    finalized_at   timestamptz,
    CHECK ((status = 'pending') = (finalized_at IS NULL)),
    CHECK (status = 'captured' OR captured = 0)
);
-- Lazy expiry under the account lock, and reserved-at-this-instant reads.
CREATE INDEX holds_pending_by_account ON holds (account_id, expires_at)
    WHERE status = 'pending';
-- The sweeper's scan for overdue holds across accounts.
CREATE INDEX holds_pending_by_expiry ON holds (expires_at) WHERE status = 'pending';

CREATE TABLE ledger_entries (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (account_id),
    sequence       bigint NOT NULL CHECK (sequence > 0),
    entry_type     text NOT NULL CHECK (entry_type IN ('credit', 'debit', 'adjustment')),
    amount         bigint NOT NULL CHECK (amount <> 0),
    balance_after  bigint NOT NULL,
    description    text NOT NULL DEFAULT '',
    reference      text NOT NULL DEFAULT '',
    metadata       jsonb NOT NULL DEFAULT '{}',
    request_id     text NOT NULL,
    reservation_id uuid REFERENCES holds (reservation_id),
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The chain: entries of one account are totally ordered without gaps.
    UNIQUE (account_id, sequence),
    CHECK (entry_type <> 'credit' OR amount > 0),
    CHECK (entry_type <> 'debit' OR amount < 0)
);
CREATE INDEX ledger_entries_by_time ON ledger_entries (account_id, created_at);

CREATE TABLE idempotency_keys (
    request_id  text PRIMARY KEY,
    method      text NOT NULL,
    fingerprint bytea NOT NULL,
    response    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The ledger is append-only: corrections are new entries.
CREATE FUNCTION tally_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'TA900';
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION tally_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION tally_refuse_change();

-- Locks the account row and expires its overdue holds, so that every money movement
-- sees reserved credit as it is at this instant.
CREATE FUNCTION tally_lock_account(p_account_id text) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    v_expired bigint;
    v_last_expiry timestamptz;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    WITH expired AS (
        UPDATE holds SET status = 'expired', finalized_at = expires_at
        WHERE account_id = p_account_id AND status = 'pending'
          AND expires_at <= clock_timestamp()
        RETURNING amount - captured AS amount, expires_at
    )
    SELECT coalesce(sum(amount), 0), max(expires_at) INTO v_expired, v_last_expiry
    FROM expired;
    IF v_expired > 0 THEN
        UPDATE accounts
        SET reserved = reserved - v_expired,
            balance_updated_at = greatest(balance_updated_at, v_last_expiry)
        WHERE account_id = p_account_id
        RETURNING * INTO a;
    END IF;
    RETURN a;
END $$;

-- The stored response of an earlier request with this key, or NULL. The same key with
-- another method or payload is an error (AIP-155).
CREATE FUNCTION tally_replay(p_request_id text, p_method text, p_fingerprint bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    k idempotency_keys;
BEGIN
    SELECT * INTO k FROM idempotency_keys WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF k.method <> p_method OR k.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'request_id reused' USING ERRCODE = 'TA409',
            DETAIL = json_build_object(
                'request_id', p_request_id,
                'original_method', k.method,
                'mismatch', CASE WHEN k.method <> p_method THEN 'method' ELSE 'payload' END
            )::text;
    END IF;
    RETURN jsonb_build_object('replayed', true, 'response', k.response);
END $$;

-- Stores the response under the key, in the transaction of the change itself.
CREATE FUNCTION tally_remember(
    p_request_id text, p_method text, p_fingerprint bytea, p_response jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
    VALUES (p_request_id, p_method, p_fingerprint, p_response);
    RETURN jsonb_build_object('replayed', false, 'response', p_response);
END $$;

-- Appends one ledger entry to a locked account and moves its balance (and, for a
-- capture, its reserved credit) in the same statement.
CREATE FUNCTION tally_post(
    p_account_id text, p_type text, p_amount bigint, p_reserved_delta bigint,
    p_description text, p_reference text, p_metadata jsonb, p_request_id text,
    p_reservation_id uuid
) RETURNS ledger_entries LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    e ledger_entries;
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE accounts
    SET balance = balance + p_amount,
        reserved = reserved + p_reserved_delta,
        last_sequence = last_sequence + 1,
        balance_updated_at = v_now
    WHERE account_id = p_account_id
    RETURNING * INTO a;
    INSERT INTO ledger_entries (
        account_id, sequence, entry_type, amount, balance_after, description,
        reference, metadata, request_id, reservation_id, created_at
    ) VALUES (
        p_account_id, a.last_sequence, p_type, p_amount, a.balance, p_description,
        p_reference, p_metadata, p_request_id, p_reservation_id, v_now
    ) RETURNING * INTO e;
    RETURN e;
END $$;

CREATE FUNCTION tally_insufficient(a accounts, p_requested bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'insufficient credits' USING ERRCODE = 'TA402',
        DETAIL = json_build_object(
            'account_id', a.account_id,
            'available', a.balance - a.reserved,
            'requested', p_requested,
            'overdraft_limit', a.overdraft_limit
        )::text;
END $$;

CREATE FUNCTION tally_create_account(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_email text,
    p_name text, p_time_zone text, p_currency text, p_overdraft_limit bigint,
    p_trial_ends_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r jsonb;
BEGIN
    r := tally_replay(p_request_id, 'CreateAccount', p_fingerprint);
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

CREATE FUNCTION tally_update_account(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_mask text[],
    p_email text, p_name text, p_time_zone text, p_overdraft_limit bigint,
    p_trial_ends_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r jsonb;
BEGIN
    PERFORM tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'UpdateAccount', p_fingerprint);
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

CREATE FUNCTION tally_reserve(
    p_request_id text, p_fingerprint bytea, p_account_id text, p_amount bigint,
    p_ttl_seconds bigint, p_reference text, p_metadata jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    h holds;
    r jsonb;
BEGIN
    a := tally_lock_account(p_account_id);
    r := tally_replay(p_request_id, 'Reserve', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    IF a.balance - a.reserved - p_amount < -a.overdraft_limit THEN
        PERFORM tally_insufficient(a, p_amount);
    END IF;
    INSERT INTO holds (account_id, status, amount, expires_at, reference, metadata,
                       request_id)
    VALUES (p_account_id, 'pending', p_amount,
            clock_timestamp() + make_interval(secs => p_ttl_seconds), p_reference,
            p_metadata, p_request_id)
    RETURNING * INTO h;
    UPDATE accounts SET reserved = reserved + p_amount, balance_updated_at = h.created_at
    WHERE account_id = p_account_id;
    RETURN tally_remember(p_request_id, 'Reserve', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h)));
END $$;

-- Locks the account that owns a reservation; returns the reservation as it is then.
CREATE FUNCTION tally_lock_reservation(p_reservation_id uuid) RETURNS holds
LANGUAGE plpgsql AS $$
DECLARE
    v_account_id text;
    h holds;
BEGIN
    SELECT account_id INTO v_account_id FROM holds WHERE reservation_id = p_reservation_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reservation not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'reservation',
                                       'id', p_reservation_id)::text;
    END IF;
    PERFORM tally_lock_account(v_account_id);
    -- Every change of a hold happens under its account's lock, so this read is stable.
    SELECT * INTO h FROM holds WHERE reservation_id = p_reservation_id;
    RETURN h;
END $$;

CREATE FUNCTION tally_require_pending(h holds) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF h.status <> 'pending' THEN
        RAISE EXCEPTION 'reservation not pending' USING ERRCODE = 'TA412',
            DETAIL = json_build_object('reservation_id', h.reservation_id,
                                       'status', h.status)::text;
    END IF;
END $$;

CREATE FUNCTION tally_capture(
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
    r := tally_replay(p_request_id, 'Capture', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    PERFORM tally_require_pending(h);
    v_amount := coalesce(p_amount, h.amount);
    IF v_amount > h.amount THEN
        RAISE EXCEPTION 'capture exceeds hold' USING ERRCODE = 'TA422',
            DETAIL = json_build_object('held', h.amount, 'requested', v_amount)::text;
    END IF;
    UPDATE holds SET status = 'captured', captured = v_amount,
                     finalized_at = clock_timestamp()
    WHERE reservation_id = p_reservation_id
    RETURNING * INTO h;
    -- The whole hold leaves reserved; only the captured part leaves the balance.
    e := tally_post(h.account_id, 'debit', -v_amount, -h.amount, p_description,
                    h.reference, h.metadata || p_metadata, p_request_id,
                    p_reservation_id);
    RETURN tally_remember(p_request_id, 'Capture', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h),
                                             'entry', to_jsonb(e)));
END $$;

CREATE FUNCTION tally_release(
    p_request_id text, p_fingerprint bytea, p_reservation_id uuid
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    h holds;
    r jsonb;
BEGIN
    h := tally_lock_reservation(p_reservation_id);
    r := tally_replay(p_request_id, 'Release', p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    PERFORM tally_require_pending(h);
    UPDATE holds SET status = 'released', finalized_at = clock_timestamp()
    WHERE reservation_id = p_reservation_id
    RETURNING * INTO h;
    UPDATE accounts SET reserved = reserved - h.amount, balance_updated_at = h.finalized_at
    WHERE account_id = h.account_id;
    RETURN tally_remember(p_request_id, 'Release', p_fingerprint,
                          jsonb_build_object('reservation', to_jsonb(h)));
END $$;

-- Debit, top-up and adjustment: one entry, no hold. Only a debit is held to the
-- balance rule; credits and adjustments may move available credit anywhere.
CREATE FUNCTION tally_move(
    p_request_id text, p_fingerprint bytea, p_method text, p_account_id text,
    p_type text, p_amount bigint, p_description text, p_reference text,
    p_metadata jsonb
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
    e := tally_post(p_account_id, p_type, p_amount, 0, p_description, p_reference,
                    p_metadata, p_request_id, NULL);
    RETURN tally_remember(p_request_id, p_method, p_fingerprint,
                          jsonb_build_object('entry', to_jsonb(e)));
END $$;

-- The sweeper's unit of work: expires one account's overdue holds under its lock.
CREATE FUNCTION tally_expire_holds(p_account_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tally_lock_account(p_account_id);
END $$;
"""

DROP = """
DROP TABLE IF EXISTS idempotency_keys, ledger_entries, holds, accounts CASCADE;
DROP FUNCTION IF EXISTS tally_refuse_change, tally_lock_account, tally_replay,
    tally_remember, tally_post, tally_insufficient, tally_create_account,
    tally_update_account, tally_reserve, tally_lock_reservation, tally_require_pending,
    tally_capture, tally_release, tally_move, tally_expire_holds CASCADE;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
