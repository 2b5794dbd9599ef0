"""GetBalance in one round trip: catch up under the lock only when something fell due,
then read the account and its grant totals in one statement (one snapshot).

Revision ID: 0005
Revises: 0004
"""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Functions only: they now live in `tally_service/sql/` (applied after every migration)."""


def downgrade() -> None:
    pass
