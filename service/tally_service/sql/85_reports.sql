-- Period reports (migration 0012, docs/design.md "Period reports"): version 1 is
-- frozen the first time a closed period is asked for; from then on, a write that
-- changes the usage of the period appends a version in its own transaction.

-- Freezes version 1 of the account's report of [p_start, p_end) (the period p_period
-- starting on the local day p_local_start of p_time_zone), unless it exists; returns
-- the report's id, NULL without the account. Safe against a concurrent freeze on
-- another replica: one INSERT wins, the other reads its row.
--
-- The account's usage writers hold its row lock from before they touch usage_rollups
-- until they commit (tally_record_usage locks it first, tally_finish_usage and the
-- hold expiry update it first). Under the share lock taken here, the sums read below
-- hold every usage write committed before, and a writer that comes after waits for
-- this commit, then its trigger sees the head row and versions its change: no write
-- is lost between version 1 and version 2.
CREATE OR REPLACE FUNCTION tally_freeze_period_report(
    p_account_id text, p_period text, p_local_start date, p_time_zone text,
    p_start timestamptz, p_end timestamptz
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT report_id INTO v_id FROM period_reports
    WHERE account_id = p_account_id AND period = p_period AND local_start = p_local_start;
    IF v_id IS NOT NULL THEN
        RETURN v_id;
    END IF;
    PERFORM 1 FROM accounts WHERE account_id = p_account_id FOR SHARE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO period_reports (account_id, period, local_start, time_zone, period_start,
                                period_end)
    VALUES (p_account_id, p_period, p_local_start, p_time_zone, p_start, p_end)
    ON CONFLICT (account_id, period, local_start) DO NOTHING
    RETURNING report_id INTO v_id;
    IF v_id IS NULL THEN
        -- Frozen by a concurrent call, committed by now (the INSERT waited for it).
        SELECT report_id INTO v_id FROM period_reports
        WHERE account_id = p_account_id AND period = p_period AND local_start = p_local_start;
        RETURN v_id;
    END IF;
    INSERT INTO period_report_versions (report_id, version) VALUES (v_id, 1);
    INSERT INTO period_report_changes (report_id, version, product_id, endpoint, requests,
                                       successful, failed, credits, quantity)
    SELECT v_id, 1, product_id, endpoint, sum(requests), sum(successful), sum(failed),
           sum(credits), sum(quantity)
    FROM usage_rollups
    WHERE account_id = p_account_id AND bucket_start >= p_start AND bucket_start < p_end
    GROUP BY product_id, endpoint;
    RETURN v_id;
END $$;

-- Rollup rows of reported periods changed by p_deltas (from the triggers of migration
-- 0012, once per statement). Each report touched gets one new version per transaction:
-- the first statement of a transaction to touch it bumps its head row (a row lock held
-- to commit, so concurrent writers number their versions one after another, with no
-- gap and no duplicate), and later statements of the same transaction add to that
-- version.
CREATE OR REPLACE FUNCTION tally_reports_changed(p_deltas tally_report_delta[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_xid xid8 := pg_current_xact_id();
BEGIN
    UPDATE period_reports h
    SET version = h.version + 1, version_xid = v_xid
    FROM (SELECT DISTINCT report_id FROM unnest(p_deltas)) d
    WHERE h.report_id = d.report_id AND h.version_xid <> v_xid;
    INSERT INTO period_report_versions (report_id, version)
    SELECT h.report_id, h.version
    FROM period_reports h
    WHERE h.report_id IN (SELECT report_id FROM unnest(p_deltas))
    ON CONFLICT (report_id, version) DO NOTHING;
    INSERT INTO period_report_changes AS c (report_id, version, product_id, endpoint,
                                            requests, successful, failed, credits, quantity)
    SELECT d.report_id, h.version, d.product_id, d.endpoint, sum(d.requests),
           sum(d.successful), sum(d.failed), sum(d.credits), sum(d.quantity)
    FROM unnest(p_deltas) d
    JOIN period_reports h ON h.report_id = d.report_id
    GROUP BY d.report_id, h.version, d.product_id, d.endpoint
    ORDER BY d.report_id, d.product_id, d.endpoint
    ON CONFLICT (report_id, version, product_id, endpoint) DO UPDATE
    SET requests = c.requests + excluded.requests,
        successful = c.successful + excluded.successful,
        failed = c.failed + excluded.failed,
        credits = c.credits + excluded.credits,
        quantity = c.quantity + excluded.quantity;
END $$;
