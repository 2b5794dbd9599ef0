"""The ledger's account reference checked by its writers: `ledger_entries.account_id`
loses its foreign key (a per-row RI trigger running its own query, 15 to 25 µs of
PostgreSQL per usage event) and keeps its guarantee for every writer.

Every function that writes entries (`tally_post_entry`, `tally_write_off`,
`tally_record_usage`, `tally_debit_run`, `tally_hold_run`) holds the lock of each
account it writes for (`tally_lock_account`'s FOR UPDATE, or the account's UPDATE)
before its INSERT, so the account exists and stays until the commit. Around that one
INSERT it sets the transaction-local `tally.references_checked` to 'on' and back to ''
(sql/30, 40, 80, 90). Any other insert (by hand, by another tool, or later in the same
transaction) finds the marker off, and a statement trigger over the inserted rows checks
their accounts as the foreign key did: each exists (SQLSTATE 23503 otherwise), locked
FOR KEY SHARE until the commit. A marker left 'on' by an error inside the INSERT goes
back with the (sub)transaction that the error rolls back.

The referenced side: `tally_account_referenced` (migration 0013, AFTER DELETE OR UPDATE
OF account_id on accounts) now also refuses while ledger entries name the account, and
a TRUNCATE of accounts is refused while ledger entries or usage events exist (with the
foreign key, `TRUNCATE accounts CASCADE` reached ledger_entries, whose own trigger
refuses a TRUNCATE; without it, nothing else would stop it).

Measured in docs/benchmarks.md, "Issue 8, stop 16".

Revision ID: 0017
Revises: 0016
"""

from tally_service.migrations.script import run_script

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

SCHEMA = r"""
-- Entries not written by a function that checked their accounts: each account exists,
-- and stays (FOR KEY SHARE, as the foreign key's check locked it), once per distinct
-- account of the statement. A statement trigger without a WHEN: a WHEN is compiled for
-- every execution of the INSERT (for one row, a WHEN reading current_setting cost
-- about as much as the foreign key's check), where the function's IF is a PL/pgSQL
-- simple expression kept for the session.
CREATE FUNCTION tally_entries_account() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_missing text;
BEGIN
    IF current_setting('tally.references_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    SELECT d.account_id INTO v_missing
    FROM (SELECT DISTINCT account_id FROM new_entries) d
    LEFT JOIN LATERAL (SELECT 1 AS found FROM accounts a
                       WHERE a.account_id = d.account_id FOR KEY SHARE) a ON true
    WHERE a.found IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert on table "ledger_entries" violates its reference account_id'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (account_id)=(%s) is not present in table "accounts".',
                                  v_missing);
    END IF;
    RETURN NULL;
END $$;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
-- No UPDATE side: ledger entries are never updated (ledger_entries_append_only).
CREATE TRIGGER ledger_entries_account AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION tally_entries_account();

-- The referenced side: an account that entries or usage events name is neither deleted
-- nor renamed, and accounts are not truncated while either table has rows.
CREATE OR REPLACE FUNCTION tally_account_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM ledger_entries) OR EXISTS (SELECT 1 FROM usage_events) THEN
            RAISE EXCEPTION 'accounts are still referenced'
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.account_id = OLD.account_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM ledger_entries WHERE account_id = OLD.account_id)
       OR EXISTS (SELECT 1 FROM usage_events WHERE account_id = OLD.account_id) THEN
        RAISE EXCEPTION 'account % is still referenced', OLD.account_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_referenced_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION tally_account_referenced();
"""

DROP = r"""
DROP TRIGGER accounts_referenced_truncate ON accounts;
CREATE OR REPLACE FUNCTION tally_account_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.account_id = OLD.account_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_events WHERE account_id = OLD.account_id) THEN
        RAISE EXCEPTION 'account % is still referenced', OLD.account_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER ledger_entries_account ON ledger_entries;
DROP FUNCTION tally_entries_account();
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_account_id_fkey
    FOREIGN KEY (account_id) REFERENCES accounts (account_id);
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
