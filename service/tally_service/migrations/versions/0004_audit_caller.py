"""The audit trail: every ledger entry records the authenticated caller that wrote it.

The server sets the transaction-local setting `tally.caller` in the same statement as
the money function (see `Database.call`); this trigger copies it into the entry's
metadata, so every path that writes entries is covered without passing it around.

Revision ID: 0004
Revises: 0003
"""

from tally_service.migrations.script import run_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE FUNCTION tally_stamp_caller() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_caller text := current_setting('tally.caller', true);
BEGIN
    IF coalesce(v_caller, '') <> '' THEN
        NEW.metadata := NEW.metadata || jsonb_build_object('caller', v_caller);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_entries_caller BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tally_stamp_caller();
"""

DROP = """
DROP TRIGGER ledger_entries_caller ON ledger_entries;
DROP FUNCTION tally_stamp_caller();
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
