"""Metering: the product catalog, usage events, 15-minute rollups, and the functions
that record, start and finish usage in the same transaction as its charge.

Rollup buckets are 15 minutes of UTC: every time zone in use is offset from UTC by a
multiple of 15 minutes, so each bucket lies inside one local day of any account, and
daily, monthly and yearly totals in the account's zone are exact sums of buckets.

Revision ID: 0002
Revises: 0001
"""

from tally_service.migrations.script import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = r"""
ALTER TABLE accounts
    ADD COLUMN usage_requests bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_activity_at timestamptz;

CREATE TABLE products (
    product_id       text PRIMARY KEY,
    display_name     text NOT NULL DEFAULT '',
    credits_per_unit bigint NOT NULL CHECK (credits_per_unit >= 0),
    charge_failed    boolean NOT NULL DEFAULT false,
    minimum_charge   bigint NOT NULL DEFAULT 0 CHECK (minimum_charge >= 0),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE usage_events (
    account_id         text NOT NULL REFERENCES accounts (account_id),
    event_id           text NOT NULL,
    product_id         text NOT NULL REFERENCES products (product_id),
    endpoint           text NOT NULL DEFAULT '',
    status             text NOT NULL
                       CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    success            boolean NOT NULL,
    status_code        integer NOT NULL DEFAULT 0,
    message            text NOT NULL DEFAULT '',
    quantity           bigint NOT NULL CHECK (quantity >= 0),
    credits            bigint NOT NULL DEFAULT 0 CHECK (credits >= 0),
    credit_type        text NOT NULL DEFAULT 'purchased',
    started_at         timestamptz NOT NULL,
    completed_at       timestamptz,
    processing_time_ms bigint NOT NULL DEFAULT 0 CHECK (processing_time_ms >= 0),
    request_metadata   jsonb NOT NULL DEFAULT '{}',
    result_metadata    jsonb NOT NULL DEFAULT '{}',
    webhook_url        text NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    entry_id           bigint REFERENCES ledger_entries (entry_id),
    reservation_id     uuid REFERENCES holds (reservation_id),
    fingerprint        bytea NOT NULL,
    finish_fingerprint bytea,
    PRIMARY KEY (account_id, event_id),
    -- DESIGN.md invariant 6: a charged event links to exactly one entry, an uncharged
    -- one to none.
    CHECK ((credits > 0) = (entry_id IS NOT NULL))
);
CREATE UNIQUE INDEX usage_events_entry ON usage_events (entry_id) WHERE entry_id IS NOT NULL;
CREATE INDEX usage_events_by_time ON usage_events (account_id, started_at DESC, event_id DESC);
CREATE INDEX usage_events_by_product_time
    ON usage_events (account_id, product_id, started_at DESC, event_id DESC);
CREATE INDEX usage_events_open_holds ON usage_events (reservation_id)
    WHERE status IN ('pending', 'processing');

CREATE TABLE usage_rollups (
    account_id   text NOT NULL,
    bucket_start timestamptz NOT NULL,
    product_id   text NOT NULL,
    endpoint     text NOT NULL,
    requests     bigint NOT NULL,
    successful   bigint NOT NULL,
    failed       bigint NOT NULL,
    credits      bigint NOT NULL,
    quantity     bigint NOT NULL,
    PRIMARY KEY (account_id, bucket_start, product_id, endpoint)
);











"""

DROP = """
DROP FUNCTION IF EXISTS tally_finish_usage, tally_start_usage, tally_event_reused,
    tally_record_usage, tally_event_result, tally_upsert_product, tally_price,
    tally_place_hold, tally_roll_up CASCADE;
DROP TABLE IF EXISTS usage_rollups, usage_events, products CASCADE;
ALTER TABLE accounts DROP COLUMN usage_requests, DROP COLUMN last_activity_at;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    # The 0001 versions of tally_lock_account and tally_reserve are restored by
    # downgrading 0001 too; a partial downgrade to 0001 is not supported.
    run_script(DROP)
