"""Core schema: accounts, holds, the append-only ledger, idempotency keys.

The functions that move money live in `tally_service/sql/` (one current definition
each), applied after the migrations by `tally_service.sqlfiles`.

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
