"""Threshold alerts: thresholds on available credit or on usage in a period, and the
notifications they emit, one outbox row per crossing, written in the transaction
that crossed it.

Both crossings are seen by triggers, so every path that moves available credit or
counts usage reaches them without knowing about alerts: a row trigger on `accounts`
when available credit falls (whatever lowered it: an entry, a hold, an expiry, a
group of usage charges in one UPDATE), and a row trigger on `usage_rollups` when a
bucket grows (a per-event roll-up or a set-based upsert alike). The trigger functions
only pass the movement on to the rules in sql/65_thresholds.sql. The first is queued
only for accounts with a live threshold on available credit (`available_alerts`).

Revision ID: 0010
Revises: 0009
"""

from tally_service.migrations.script import run_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SCHEMA = r"""
-- Whether the account has a live threshold on available credit: the trigger's WHEN
-- reads it, so a movement of any other account queues no trigger at all.
ALTER TABLE accounts ADD COLUMN available_alerts boolean NOT NULL DEFAULT false;

CREATE TABLE thresholds (
    threshold_id  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id    text NOT NULL REFERENCES accounts (account_id),
    metric        text NOT NULL
        CHECK (metric IN ('available_credit', 'usage_credits', 'usage_requests')),
    -- The caller's value (micro-credits, or requests) and the share of it that fires.
    value         bigint NOT NULL,
    percent       integer NOT NULL DEFAULT 100 CHECK (percent BETWEEN 1 AND 100),
    -- What is compared: available < fire_at, or usage in the period >= fire_at.
    fire_at       bigint NOT NULL,
    period        text CHECK (period IN ('day', 'month')),
    request_id    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted_at    timestamptz,
    -- Usage counted so far in the current period (usage metrics only).
    period_start  timestamptz,
    period_value  bigint NOT NULL DEFAULT 0,
    CHECK ((metric = 'available_credit') = (period IS NULL))
);
CREATE INDEX thresholds_by_account ON thresholds (account_id, created_at DESC, threshold_id DESC);
CREATE INDEX thresholds_live ON thresholds (account_id, metric) WHERE deleted_at IS NULL;

CREATE TABLE notifications (
    notification_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id      text NOT NULL REFERENCES accounts (account_id),
    threshold_id    uuid NOT NULL REFERENCES thresholds (threshold_id),
    metric          text NOT NULL,
    observed        bigint NOT NULL,
    fire_at         bigint NOT NULL,
    period_start    timestamptz,
    crossed_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered')),
    attempts        integer NOT NULL DEFAULT 0,
    error           text NOT NULL DEFAULT '',
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until     timestamptz,
    delivered_at    timestamptz,
    CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);
-- A usage threshold fires at most once per period, whatever the code does.
CREATE UNIQUE INDEX notifications_once_per_period ON notifications (threshold_id, period_start)
    WHERE period_start IS NOT NULL;
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_by_account
    ON notifications (account_id, crossed_at DESC, notification_id DESC);

CREATE FUNCTION tally_accounts_thresholds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tally_available_moved(NEW.account_id, OLD.balance - OLD.reserved,
                                  NEW.balance - NEW.reserved);
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_thresholds AFTER UPDATE OF balance, reserved ON accounts
    FOR EACH ROW
    WHEN (NEW.available_alerts AND NEW.balance - NEW.reserved < OLD.balance - OLD.reserved)
    EXECUTE FUNCTION tally_accounts_thresholds();

CREATE FUNCTION tally_rollups_thresholds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM tally_usage_counted(NEW.account_id, NEW.bucket_start, NEW.requests,
                                    NEW.credits);
    ELSE
        PERFORM tally_usage_counted(NEW.account_id, NEW.bucket_start,
                                    NEW.requests - OLD.requests, NEW.credits - OLD.credits);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER usage_rollups_thresholds AFTER INSERT OR UPDATE ON usage_rollups
    FOR EACH ROW EXECUTE FUNCTION tally_rollups_thresholds();
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(
        "DROP TRIGGER usage_rollups_thresholds ON usage_rollups;"
        "DROP TRIGGER accounts_thresholds ON accounts;"
        "DROP FUNCTION tally_rollups_thresholds(); DROP FUNCTION tally_accounts_thresholds();"
        "DROP TABLE notifications; DROP TABLE thresholds;"
        "ALTER TABLE accounts DROP COLUMN available_alerts;"
    )
