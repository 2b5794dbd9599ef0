"""A grant draw becomes a HOT update: no index of grants mentions `remaining`.

Every debit draws grants (`UPDATE grants SET remaining = …`). Both partial indexes of
grants had `remaining > 0` in their predicate, and PostgreSQL makes an update HOT (no new
index entries, the new row version on the same page) only when no column an index
mentions changes, predicates included: every draw wrote a new entry into each of the
four indexes of grants, and on a hot account every later statement stepped over the dead
ones (docs/benchmarks.md, "Where a movement's PostgreSQL time goes": 98 µs a draw, 380 µs
on a hot account inside a group).

`spent` is a stored generated column, `remaining = 0`, and the indexes use it instead.
A draw that leaves credit in the grant does not change `spent`, so it is HOT; only the
draw that exhausts a grant (once in its life) is not. The queries say `NOT spent` where
they said `remaining > 0` (the same rows: `remaining >= 0` is checked), so the planner
can use the partial indexes. Exhausted grants stay out of both indexes, so an account
with many spent grants draws and catches up as cheaply as before.

The draw order index also ends with grant_id, the last key of the draw order, so a draw
reads its grants in order from the index without a sort.

Revision ID: 0014
Revises: 0013
"""

from tally_service.migrations.script import run_script

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

SCHEMA = r"""
ALTER TABLE grants ADD COLUMN spent boolean GENERATED ALWAYS AS (remaining = 0) STORED;
DROP INDEX grants_draw_order;
DROP INDEX grants_expiring;
-- The draw order, over live grants only.
CREATE INDEX grants_draw_order
    ON grants (account_id, priority, expires_at, created_at, grant_id) WHERE NOT spent;
-- Live grants that will fall due (the sweeper, the catch-up of an account).
CREATE INDEX grants_expiring ON grants (expires_at)
    WHERE NOT spent AND NOT expired AND expires_at IS NOT NULL;
"""

DROP = r"""
DROP INDEX grants_expiring;
DROP INDEX grants_draw_order;
ALTER TABLE grants DROP COLUMN spent;
CREATE INDEX grants_draw_order ON grants (account_id, priority, expires_at, created_at)
    WHERE remaining > 0;
CREATE INDEX grants_expiring ON grants (expires_at)
    WHERE remaining > 0 AND expires_at IS NOT NULL;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
