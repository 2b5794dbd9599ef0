"""One statement-trigger pair on `usage_rollups` instead of five triggers, and
tally_record_usage counts its own rollups.

Every change of `usage_rollups` sets off three things: its local days in `usage_days`
(0011), a new version of each period report whose period it touches (0012), and the
usage thresholds it crosses (0010). They were five triggers: two statement-trigger
pairs with transition tables (days, reports; INSERT and UPDATE, both fired by an
upsert) and a row trigger (thresholds), each running its own queries, about 0.4 to
0.6 ms of PostgreSQL per statement whatever its size (instrumented): a large part of
the fixed cost of a small usage group.

- One pair now (AFTER INSERT, AFTER UPDATE; a trigger with transition tables takes
  one event): `tally_rollups_changed` sums the statement's changes (the new rows, less
  the old ones of an update) per rollup row once and passes them to
  `tally_rollups_counted` (sql/80_usage.sql), which upserts the days in one statement,
  probes the period reports (one index probe when nothing is reported after the
  earliest bucket, as before) and calls the threshold rule for each changed bucket of
  an account with a live usage threshold, in order (the row trigger's rule, per row).
- `tally_record_usage` upserts the days of its group in its own write statement and,
  when a report or a live usage threshold can care (decided in that statement), calls
  `tally_rollups_counted` itself with the rollup changes it has already summed; around
  that statement it sets `tally.rollups_counted` (local to the transaction, reset
  after the statement), which the triggers' WHEN reads, so they do not count its rows
  a second time. Every other writer of the rollups (a
  finished or failed job, a hold's expiry, a statement written by hand) is counted by
  the triggers as before.

Revision ID: 0015
Revises: 0014
"""

from tally_service.migrations.script import run_script

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

SCHEMA = r"""
-- A change of one rollup row (signed).
CREATE TYPE tally_rollup_delta AS (
    account_id   text,
    bucket_start timestamptz,
    product_id   text,
    endpoint     text,
    requests     bigint,
    successful   bigint,
    failed       bigint,
    credits      bigint,
    quantity     bigint
);

DROP TRIGGER usage_rollups_thresholds ON usage_rollups;
DROP TRIGGER usage_rollups_days_insert ON usage_rollups;
DROP TRIGGER usage_rollups_days_update ON usage_rollups;
DROP TRIGGER usage_rollups_reports_insert ON usage_rollups;
DROP TRIGGER usage_rollups_reports_update ON usage_rollups;
DROP FUNCTION tally_rollups_thresholds();
DROP FUNCTION tally_rollups_days();
DROP FUNCTION tally_rollups_inserted_reports();
DROP FUNCTION tally_rollups_updated_reports();

-- A statement's changes to usage_rollups, per rollup row (the new rows, less the old
-- ones of an update), passed on to tally_rollups_counted (sql/80_usage.sql).
CREATE FUNCTION tally_rollups_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_deltas tally_rollup_delta[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(ROW(n.account_id, n.bucket_start, n.product_id, n.endpoint,
                             n.requests, n.successful, n.failed, n.credits,
                             n.quantity)::tally_rollup_delta
                         ORDER BY n.account_id, n.bucket_start, n.product_id, n.endpoint)
        INTO v_deltas
        FROM new_rows n;
    ELSE
        SELECT array_agg(ROW(c.account_id, c.bucket_start, c.product_id, c.endpoint,
                             c.requests, c.successful, c.failed, c.credits,
                             c.quantity)::tally_rollup_delta
                         ORDER BY c.account_id, c.bucket_start, c.product_id, c.endpoint)
        INTO v_deltas
        FROM (SELECT account_id, bucket_start, product_id, endpoint, sum(requests) AS requests,
                     sum(successful) AS successful, sum(failed) AS failed,
                     sum(credits) AS credits, sum(quantity) AS quantity
              FROM (SELECT account_id, bucket_start, product_id, endpoint, requests,
                           successful, failed, credits, quantity
                    FROM new_rows
                    UNION ALL
                    SELECT account_id, bucket_start, product_id, endpoint, -requests,
                           -successful, -failed, -credits, -quantity
                    FROM old_rows) u
              GROUP BY 1, 2, 3, 4) c;
    END IF;
    IF v_deltas IS NOT NULL THEN
        PERFORM tally_rollups_counted(v_deltas, true);
    END IF;
    RETURN NULL;
END $$;
-- Not for the statement of tally_record_usage, which counts its own rows (it sets
-- tally.rollups_counted around that statement only).
CREATE TRIGGER usage_rollups_changed_insert AFTER INSERT ON usage_rollups
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('tally.rollups_counted', true), '') <> 'on')
    EXECUTE FUNCTION tally_rollups_changed();
CREATE TRIGGER usage_rollups_changed_update AFTER UPDATE ON usage_rollups
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('tally.rollups_counted', true), '') <> 'on')
    EXECUTE FUNCTION tally_rollups_changed();
"""

# The five triggers of 0010, 0011 and 0012 again, with their functions as they were.
DROP = r"""
DROP TRIGGER usage_rollups_changed_update ON usage_rollups;
DROP TRIGGER usage_rollups_changed_insert ON usage_rollups;
DROP FUNCTION tally_rollups_changed();
DROP FUNCTION IF EXISTS tally_rollups_counted(tally_rollup_delta[], boolean);
DROP TYPE tally_rollup_delta;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    from importlib import import_module

    run_script(DROP)
    # The triggers of 0010 to 0012 come back from their own migrations' text.
    versions = "tally_service.migrations.versions."
    for name, start, end in (
        ("0010_thresholds", "CREATE FUNCTION tally_rollups_thresholds()", None),
        ("0011_usage_days", "CREATE FUNCTION tally_rollups_days()", "-- The account's days"),
        ("0012_period_reports", "CREATE FUNCTION tally_rollups_inserted_reports()", None),
    ):
        text: str = import_module(versions + name).SCHEMA
        part = text[text.index(start) :]
        if end is not None:
            part = part[: part.index(end)]
        run_script(part)
