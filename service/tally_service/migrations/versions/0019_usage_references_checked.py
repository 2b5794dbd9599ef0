"""The references of tally_record_usage's events are checked by the function itself.

`usage_events_references` (migration 0013) checks, once per statement that inserts
events, that their accounts and products exist (locking each FOR KEY SHARE) and that
each charged event's ledger entry exists. For the write statement of
`tally_record_usage` every part of that is already known: its accounts are locked FOR
UPDATE before anything is read, its products are locked FOR KEY SHARE by the function
(sql/80_usage.sql) before they are read, and each entry is inserted by the same
statement. The check cost about 0.15-0.3 ms of a call and a probe of the ledger per
event (docs/benchmarks.md, "Issue 8, stop 16"). So the trigger gets a WHEN: it is skipped
while the transaction-local `tally.references_checked` is 'on', which the function sets
around that one statement only (as `tally.rollups_counted`, migration 0015). Every other
insert of events (StartUsage, a statement by hand) is checked as before.

Revision ID: 0019
Revises: 0016
"""

from tally_service.migrations.script import run_script

revision = "0019"
down_revision = "0016"
branch_labels = None
depends_on = None

SCHEMA = r"""
DROP TRIGGER usage_events_references ON usage_events;
CREATE TRIGGER usage_events_references AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('tally.references_checked', true), '') <> 'on')
    EXECUTE FUNCTION tally_events_references();
"""

DROP = r"""
DROP TRIGGER usage_events_references ON usage_events;
CREATE TRIGGER usage_events_references AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION tally_events_references();
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
