"""The references of tally_record_usage's events are checked by the function itself.

`usage_events_references` (migration 0013) checks, once per statement that inserts
events, that their accounts and products exist (locking each FOR KEY SHARE) and that
each charged event's ledger entry exists. For the write statement of
`tally_record_usage` every part of that is already known: its accounts are locked FOR
UPDATE before anything is read, its products are locked FOR KEY SHARE by the function
(sql/80_usage.sql) before they are read, and each entry is inserted by the same
statement. The check cost about 0.15-0.3 ms of a call and a probe of the ledger per
event (docs/benchmarks.md, "Issue 8, stop 16"). So the trigger function returns at once
while the transaction-local `tally.references_checked` is 'on': the one mark of
migration 0017 (ledger_entries_account), which the writers set around their own INSERT
only. An IF in the function, not a WHEN on the trigger, as there: a WHEN is compiled at
every execution of the statement. Every other insert of events (StartUsage, a statement
by hand) is checked as before; the row trigger on updates is never skipped.

Revision ID: 0018
Revises: 0017
"""

from tally_service.migrations.script import run_script

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE OR REPLACE FUNCTION tally_events_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_column text;
    v_missing text;
BEGIN
    -- The statement of a writer that checked its references itself (the mark of
    -- migration 0017, set by tally_record_usage around its write only).
    IF TG_LEVEL = 'STATEMENT' AND current_setting('tally.references_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_LEVEL = 'ROW' THEN
        -- an update that changed a reference (the WHEN of the trigger): that row
        IF NOT EXISTS (SELECT 1 FROM accounts WHERE account_id = NEW.account_id
                       FOR KEY SHARE) THEN
            v_column := 'account_id';
            v_missing := NEW.account_id;
        ELSIF NOT EXISTS (SELECT 1 FROM products WHERE product_id = NEW.product_id
                          FOR KEY SHARE) THEN
            v_column := 'product_id';
            v_missing := NEW.product_id;
        ELSIF NEW.entry_id IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM ledger_entries WHERE entry_id = NEW.entry_id) THEN
            v_column := 'entry_id';
            v_missing := NEW.entry_id::text;
        END IF;
    ELSE
        SELECT 'account_id', d.account_id INTO v_column, v_missing
        FROM (SELECT DISTINCT account_id FROM new_events) d
        LEFT JOIN LATERAL (SELECT 1 AS found FROM accounts a
                           WHERE a.account_id = d.account_id FOR KEY SHARE) a ON true
        WHERE a.found IS NULL
        LIMIT 1;
        IF NOT FOUND THEN
            SELECT 'product_id', d.product_id INTO v_column, v_missing
            FROM (SELECT DISTINCT product_id FROM new_events) d
            LEFT JOIN LATERAL (SELECT 1 AS found FROM products p
                               WHERE p.product_id = d.product_id FOR KEY SHARE) p ON true
            WHERE p.found IS NULL
            LIMIT 1;
        END IF;
        IF NOT FOUND THEN
            -- one probe of the primary key per event (a scalar subquery: never a scan
            -- of the whole ledger, whatever the planner guesses)
            SELECT 'entry_id', n.entry_id::text INTO v_column, v_missing
            FROM new_events n
            WHERE n.entry_id IS NOT NULL
              AND (SELECT l.entry_id FROM ledger_entries l WHERE l.entry_id = n.entry_id)
                  IS NULL
            LIMIT 1;
        END IF;
    END IF;
    IF v_column IS NOT NULL THEN
        RAISE EXCEPTION 'insert or update on table "usage_events" violates its reference %',
                        v_column
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (%s)=(%s) is not present.', v_column, v_missing);
    END IF;
    RETURN NULL;
END $$;
"""

DROP = r"""
CREATE OR REPLACE FUNCTION tally_events_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_column text;
    v_missing text;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        -- an update that changed a reference (the WHEN of the trigger): that row
        IF NOT EXISTS (SELECT 1 FROM accounts WHERE account_id = NEW.account_id
                       FOR KEY SHARE) THEN
            v_column := 'account_id';
            v_missing := NEW.account_id;
        ELSIF NOT EXISTS (SELECT 1 FROM products WHERE product_id = NEW.product_id
                          FOR KEY SHARE) THEN
            v_column := 'product_id';
            v_missing := NEW.product_id;
        ELSIF NEW.entry_id IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM ledger_entries WHERE entry_id = NEW.entry_id) THEN
            v_column := 'entry_id';
            v_missing := NEW.entry_id::text;
        END IF;
    ELSE
        SELECT 'account_id', d.account_id INTO v_column, v_missing
        FROM (SELECT DISTINCT account_id FROM new_events) d
        LEFT JOIN LATERAL (SELECT 1 AS found FROM accounts a
                           WHERE a.account_id = d.account_id FOR KEY SHARE) a ON true
        WHERE a.found IS NULL
        LIMIT 1;
        IF NOT FOUND THEN
            SELECT 'product_id', d.product_id INTO v_column, v_missing
            FROM (SELECT DISTINCT product_id FROM new_events) d
            LEFT JOIN LATERAL (SELECT 1 AS found FROM products p
                               WHERE p.product_id = d.product_id FOR KEY SHARE) p ON true
            WHERE p.found IS NULL
            LIMIT 1;
        END IF;
        IF NOT FOUND THEN
            -- one probe of the primary key per event (a scalar subquery: never a scan
            -- of the whole ledger, whatever the planner guesses)
            SELECT 'entry_id', n.entry_id::text INTO v_column, v_missing
            FROM new_events n
            WHERE n.entry_id IS NOT NULL
              AND (SELECT l.entry_id FROM ledger_entries l WHERE l.entry_id = n.entry_id)
                  IS NULL
            LIMIT 1;
        END IF;
    END IF;
    IF v_column IS NOT NULL THEN
        RAISE EXCEPTION 'insert or update on table "usage_events" violates its reference %',
                        v_column
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (%s)=(%s) is not present.', v_column, v_missing);
    END IF;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
