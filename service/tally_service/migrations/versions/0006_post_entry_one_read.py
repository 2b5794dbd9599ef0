"""The hot path reads the account row once: `tally_post_entry` takes the state before
the movement from its own UPDATE ... RETURNING (before = after - movement) instead of a
separate SELECT, and decides the auto-reload on that row instead of reading it again.

Revision ID: 0006
Revises: 0005
"""

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Functions only: they now live in `tally_service/sql/` (applied after every migration)."""


def downgrade() -> None:
    pass
