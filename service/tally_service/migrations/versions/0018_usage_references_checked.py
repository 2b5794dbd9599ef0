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

# The function of migration 0013 with one test put first. It is rewritten from its own
# definition (pg_get_functiondef keeps the body as written), not copied here again.
_ANCHOR = "    IF TG_LEVEL = 'ROW' THEN"
_MARK = """    -- The statement of a writer that checked its references itself (the mark of
    -- migration 0017, set by tally_record_usage around its write statement only).
    IF TG_LEVEL = 'STATEMENT' AND current_setting('tally.references_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
"""


def _rewrite(old: str, new: str) -> str:
    """A script that replaces ``old`` by ``new`` (once) in tally_events_references."""
    return f"""
DO $migration$
DECLARE
    v_def text := pg_get_functiondef('tally_events_references()'::regprocedure);
BEGIN
    IF position($old${old}$old$ IN v_def) = 0 THEN
        RAISE EXCEPTION 'tally_events_references is not the function this migration expects';
    END IF;
    EXECUTE replace(v_def, $old${old}$old$, $new${new}$new$);
END $migration$;
"""


def upgrade() -> None:
    run_script(_rewrite(_ANCHOR, _MARK + _ANCHOR))


def downgrade() -> None:
    run_script(_rewrite(_MARK + _ANCHOR, _ANCHOR))
