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
















"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    raise NotImplementedError("0003 cannot be downgraded: grants carry ledger meaning")
