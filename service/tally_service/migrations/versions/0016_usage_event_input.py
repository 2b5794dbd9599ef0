"""`tally_usage_event`: one finished event as `tally_record_usage` takes it (sql/80_usage.sql),
so a group goes as one array of records instead of a JSON document.

The driver sends an array of records in binary, each field by its type's own binary
form (the times as timestamps, the fingerprint as bytes), from the server's tuples
(`tally_service.db.UsageItem`, whose fields are these attributes in this order), with
no text built per event on either side. The metadata travels as JSON text, cast to
jsonb once in the function (the driver encodes text in compiled code).

Revision ID: 0016
Revises: 0015
"""

from tally_service.migrations.script import run_script

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TYPE tally_usage_event AS (
    idx                integer,  -- the caller's index of the event (results are keyed by it)
    account_id         text,
    event_id           text,
    product_id         text,
    endpoint           text,
    status             text,
    success            boolean,
    status_code        integer,
    message            text,
    quantity           bigint,
    credits            bigint,   -- the charge the caller stated; NULL: the catalog's price
    started_at         timestamptz,
    completed_at       timestamptz,
    processing_time_ms bigint,
    request_metadata   text,     -- JSON text
    result_metadata    text,     -- JSON text
    webhook_url        text,
    fingerprint        bytea
);
"""

DROP = r"""
DROP FUNCTION IF EXISTS tally_record_usage(tally_usage_event[]);
DROP TYPE tally_usage_event;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
