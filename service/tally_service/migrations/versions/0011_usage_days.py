"""Whole-day usage: `usage_days`, the 15-minute rollups summed per local calendar day of
the account, so that GetUsage over a year reads about 365 rows per product and
endpoint instead of 35,000 quarter-hours.

`day` is the date in the account's time zone (`accounts.time_zone`) of the quarter-hour
buckets it sums. The 15-minute buckets tile local days exactly because every zone's
offset has been a multiple of 15 minutes since 1972 (the last exception,
Africa/Monrovia at -0:44:30, ended on 1972-01-07); before that some zones' local
midnights fall inside a bucket, and GetUsage reads the 15-minute path there
(tally_service.reads).

It stays equal to `SELECT ... GROUP BY account_id, (bucket_start AT TIME ZONE
time_zone)::date, product_id, endpoint` over `usage_rollups` by triggers alone, so no
writer of the rollups knows about it:

- Two statement-level triggers on `usage_rollups` (AFTER INSERT, AFTER UPDATE; a
  trigger with transition tables takes one event) sum a statement's changes (the new
  rows, less the old ones of an update) per account, local day, product and endpoint
  and upsert them in one statement: the per-event roll-up, the set-based upsert of
  tally_record_usage (INSERT ... ON CONFLICT DO UPDATE fires both, each with its own
  rows), a job finished or failed by its hold's expiry. A backdated event lands in its
  own day the same way. Every writer of the rollups holds the account's row lock (and
  the account's rollups are written under it), so days of one account are never
  written concurrently.
- A row trigger on `accounts` when `time_zone` changes rebuilds the account's days from
  its rollups in the same transaction (DELETE, then one INSERT ... SELECT ... GROUP BY).

Revision ID: 0011
Revises: 0010
"""

from tally_service.migrations.script import run_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TABLE usage_days (
    account_id  text NOT NULL REFERENCES accounts (account_id),
    day         date NOT NULL,  -- local calendar day in the account's time zone
    product_id  text NOT NULL,
    endpoint    text NOT NULL,
    requests    bigint NOT NULL,
    successful  bigint NOT NULL,
    failed      bigint NOT NULL,
    credits     bigint NOT NULL,
    quantity    bigint NOT NULL,
    PRIMARY KEY (account_id, day, product_id, endpoint)
);

-- A statement's changes to usage_rollups (rows added to the 15-minute buckets, and for
-- an update the rows they replaced, subtracted), summed per local day and upserted.
CREATE FUNCTION tally_rollups_days() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO usage_days AS d (account_id, day, product_id, endpoint, requests,
                                     successful, failed, credits, quantity)
        SELECT n.account_id, (n.bucket_start AT TIME ZONE a.time_zone)::date, n.product_id,
               n.endpoint, sum(n.requests), sum(n.successful), sum(n.failed),
               sum(n.credits), sum(n.quantity)
        FROM new_rows n JOIN accounts a ON a.account_id = n.account_id
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, day, product_id, endpoint) DO UPDATE
        SET requests = d.requests + excluded.requests,
            successful = d.successful + excluded.successful,
            failed = d.failed + excluded.failed,
            credits = d.credits + excluded.credits,
            quantity = d.quantity + excluded.quantity;
    ELSE
        INSERT INTO usage_days AS d (account_id, day, product_id, endpoint, requests,
                                     successful, failed, credits, quantity)
        SELECT c.account_id, (c.bucket_start AT TIME ZONE a.time_zone)::date, c.product_id,
               c.endpoint, sum(c.requests), sum(c.successful), sum(c.failed),
               sum(c.credits), sum(c.quantity)
        FROM (SELECT account_id, bucket_start, product_id, endpoint, requests, successful,
                     failed, credits, quantity
              FROM new_rows
              UNION ALL
              SELECT account_id, bucket_start, product_id, endpoint, -requests, -successful,
                     -failed, -credits, -quantity
              FROM old_rows) c
        JOIN accounts a ON a.account_id = c.account_id
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account_id, day, product_id, endpoint) DO UPDATE
        SET requests = d.requests + excluded.requests,
            successful = d.successful + excluded.successful,
            failed = d.failed + excluded.failed,
            credits = d.credits + excluded.credits,
            quantity = d.quantity + excluded.quantity;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER usage_rollups_days_insert AFTER INSERT ON usage_rollups
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tally_rollups_days();
CREATE TRIGGER usage_rollups_days_update AFTER UPDATE ON usage_rollups
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tally_rollups_days();

-- The account's days again from its rollups, in its new time zone.
CREATE FUNCTION tally_accounts_usage_days() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM usage_days WHERE account_id = NEW.account_id;
    INSERT INTO usage_days (account_id, day, product_id, endpoint, requests, successful,
                            failed, credits, quantity)
    SELECT account_id, (bucket_start AT TIME ZONE NEW.time_zone)::date, product_id,
           endpoint, sum(requests), sum(successful), sum(failed), sum(credits),
           sum(quantity)
    FROM usage_rollups
    WHERE account_id = NEW.account_id
    GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_usage_days AFTER UPDATE OF time_zone ON accounts
    FOR EACH ROW WHEN (NEW.time_zone IS DISTINCT FROM OLD.time_zone)
    EXECUTE FUNCTION tally_accounts_usage_days();

-- The days of the rollups already written (the triggers above already hold the table:
-- CREATE TRIGGER locks out writers of usage_rollups until this transaction commits).
INSERT INTO usage_days (account_id, day, product_id, endpoint, requests, successful, failed,
                        credits, quantity)
SELECT r.account_id, (r.bucket_start AT TIME ZONE a.time_zone)::date, r.product_id,
       r.endpoint, sum(r.requests), sum(r.successful), sum(r.failed), sum(r.credits),
       sum(r.quantity)
FROM usage_rollups r JOIN accounts a ON a.account_id = r.account_id
GROUP BY 1, 2, 3, 4;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(
        "DROP TRIGGER accounts_usage_days ON accounts;"
        "DROP TRIGGER usage_rollups_days_update ON usage_rollups;"
        "DROP TRIGGER usage_rollups_days_insert ON usage_rollups;"
        "DROP FUNCTION tally_accounts_usage_days(); DROP FUNCTION tally_rollups_days();"
        "DROP TABLE usage_days;"
    )
