"""Period reports: the usage of one account in one closed day or month of its time
zone, frozen as version 1 the first time it is asked for, and versioned from then on:
a write that changes usage in a reported period appends a new version, in the
transaction of the write (docs/design.md, "Period reports").

A version stores only what changed (`period_report_changes`, per product and
endpoint); the lines at version N are the sum of the changes of versions 1 to N.
Version 1's changes are the whole period as it stood when it was frozen.

Every usage write passes through `usage_rollups`, so two statement-level triggers on it
(INSERT, and UPDATE for the DO UPDATE of an upsert; both fire for one upsert) see every
change, once per statement, from their transition tables. A statement whose buckets
all lie after the latest end of any report (every live write) stops at one index probe;
else each touched (account, bucket) before it is probed against the account's reports,
and the differences for the reports whose period holds the bucket are passed on to
`tally_reports_changed` (sql/85_reports.sql).

Revision ID: 0012
Revises: 0011
"""

from tally_service.migrations.script import run_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SCHEMA = r"""
-- The head row of a report: its period, fixed when version 1 was frozen, and its
-- latest version. Writers lock it (UPDATE) to append a version, so concurrent writers
-- number their versions one after another; `version_xid` is the transaction that made
-- the latest version, so that a transaction makes at most one version of a report
-- however many statements of it touch the period.
CREATE TABLE period_reports (
    report_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts (account_id),
    period       text NOT NULL CHECK (period IN ('day', 'month')),
    -- The first local day of the period, in `time_zone` (the account's when frozen).
    local_start  date NOT NULL,
    time_zone    text NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    version      integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    version_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (account_id, period, local_start),
    CHECK (period_start < period_end)
);
-- Reports of the account whose period ends after a bucket.
CREATE INDEX period_reports_by_end ON period_reports (account_id, period_end);

CREATE TABLE period_report_versions (
    report_id  bigint NOT NULL REFERENCES period_reports (report_id),
    version    integer NOT NULL CHECK (version >= 1),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (report_id, version)
);

-- What a version changed, per product and endpoint (signed; micro-credits).
CREATE TABLE period_report_changes (
    report_id  bigint NOT NULL,
    version    integer NOT NULL,
    product_id text NOT NULL,
    endpoint   text NOT NULL,
    requests   bigint NOT NULL,
    successful bigint NOT NULL,
    failed     bigint NOT NULL,
    credits    bigint NOT NULL,
    quantity   bigint NOT NULL,
    PRIMARY KEY (report_id, version, product_id, endpoint),
    FOREIGN KEY (report_id, version) REFERENCES period_report_versions (report_id, version)
);

-- One difference of a rollup row, for a report whose period holds its bucket.
CREATE TYPE tally_report_delta AS (
    report_id  bigint,
    product_id text,
    endpoint   text,
    requests   bigint,
    successful bigint,
    failed     bigint,
    credits    bigint,
    quantity   bigint
);

-- The triggers' probes. First the latest end of any report: a statement whose buckets
-- all lie at or after it (every live write, as reports are of closed periods) stops
-- there. Else, for each distinct (account, bucket) before it, the account's reports
-- ending after the bucket (one index probe each, forced by OFFSET 0: joined as sets,
-- a large statement would scan every report).
CREATE INDEX period_reports_end ON period_reports (period_end);

CREATE FUNCTION tally_rollups_inserted_reports() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz := (SELECT max(period_end) FROM period_reports);
    v_deltas tally_report_delta[];
BEGIN
    IF v_until IS NULL OR NOT EXISTS (SELECT 1 FROM new_rollups WHERE bucket_start < v_until)
    THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(ROW(h.report_id, n.product_id, n.endpoint, n.requests, n.successful,
                         n.failed, n.credits, n.quantity)::tally_report_delta)
    INTO v_deltas
    FROM (SELECT DISTINCT account_id, bucket_start FROM new_rollups
          WHERE bucket_start < v_until) t
    CROSS JOIN LATERAL (
        SELECT r.report_id FROM period_reports r
        WHERE r.account_id = t.account_id AND r.period_end > t.bucket_start
          AND r.period_start <= t.bucket_start
        OFFSET 0) h
    JOIN new_rollups n ON n.account_id = t.account_id AND n.bucket_start = t.bucket_start;
    IF v_deltas IS NOT NULL THEN
        PERFORM tally_reports_changed(v_deltas);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER usage_rollups_reports_insert AFTER INSERT ON usage_rollups
    REFERENCING NEW TABLE AS new_rollups
    FOR EACH STATEMENT EXECUTE FUNCTION tally_rollups_inserted_reports();

CREATE FUNCTION tally_rollups_updated_reports() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz := (SELECT max(period_end) FROM period_reports);
    v_deltas tally_report_delta[];
BEGIN
    IF v_until IS NULL OR NOT EXISTS (SELECT 1 FROM new_rollups WHERE bucket_start < v_until)
    THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(ROW(h.report_id, n.product_id, n.endpoint, n.requests - o.requests,
                         n.successful - o.successful, n.failed - o.failed,
                         n.credits - o.credits, n.quantity - o.quantity)::tally_report_delta)
    INTO v_deltas
    FROM (SELECT DISTINCT account_id, bucket_start FROM new_rollups
          WHERE bucket_start < v_until) t
    CROSS JOIN LATERAL (
        SELECT r.report_id FROM period_reports r
        WHERE r.account_id = t.account_id AND r.period_end > t.bucket_start
          AND r.period_start <= t.bucket_start
        OFFSET 0) h
    JOIN new_rollups n ON n.account_id = t.account_id AND n.bucket_start = t.bucket_start
    JOIN old_rollups o ON o.account_id = n.account_id AND o.bucket_start = n.bucket_start
                      AND o.product_id = n.product_id AND o.endpoint = n.endpoint;
    IF v_deltas IS NOT NULL THEN
        PERFORM tally_reports_changed(v_deltas);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER usage_rollups_reports_update AFTER UPDATE ON usage_rollups
    REFERENCING OLD TABLE AS old_rollups NEW TABLE AS new_rollups
    FOR EACH STATEMENT EXECUTE FUNCTION tally_rollups_updated_reports();
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(
        "DROP TRIGGER usage_rollups_reports_update ON usage_rollups;"
        "DROP TRIGGER usage_rollups_reports_insert ON usage_rollups;"
        "DROP FUNCTION tally_rollups_updated_reports();"
        "DROP FUNCTION tally_rollups_inserted_reports();"
        "DROP FUNCTION IF EXISTS tally_reports_changed(tally_report_delta[]);"
        "DROP TYPE tally_report_delta;"
        "DROP TABLE period_report_changes; DROP TABLE period_report_versions;"
        "DROP TABLE period_reports;"
    )
