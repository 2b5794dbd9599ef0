"""Set-based recording of usage: `tally_record_usage` applies a group of events with a
few set operations instead of one loop turn per event.

- `tally_usage_item`: one event of a group as the function holds it (expanded from the
  JSON once, priced once), so every set operation reads the same array.
- The `usage_events_credit_type` trigger (one SELECT per inserted row) is dropped: the
  two writers of `usage_events.entry_id`, `tally_record_usage` and `tally_finish_usage`,
  now set `credit_type` themselves from the entry they write.

Revision ID: 0009
Revises: 0008
"""

from tally_service.migrations.script import run_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TYPE tally_usage_item AS (
    pos                integer,  -- position in the group, in (account_id, idx) order
    idx                integer,  -- the caller's index of the event
    account_id         text,
    event_id           text,
    product_id         text,
    endpoint           text,
    status             text,
    success            boolean,
    status_code        integer,
    message            text,
    quantity           bigint,
    charge             bigint,   -- the price; NULL: unknown product; -1: beyond BIGINT
    started_at         timestamptz,
    completed_at       timestamptz,
    processing_time_ms bigint,
    request_metadata   jsonb,
    result_metadata    jsonb,
    webhook_url        text,
    fingerprint        bytea
);

DROP TRIGGER usage_events_credit_type ON usage_events;
DROP FUNCTION tally_event_credit_type();
"""

DROP = r"""
DROP TYPE tally_usage_item;
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
    # The sql/ files of this revision need the type; run the earlier revision's files.
    run_script(DROP)
