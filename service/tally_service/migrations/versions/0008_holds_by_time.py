"""Holds by account and time of placement, for the balance at a past instant
(GetBalance with `as_of`): the holds that can count at an instant are those placed in
the longest TTL before it, one index range.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX holds_by_account_time ON holds (account_id, created_at)")


def downgrade() -> None:
    op.execute("DROP INDEX holds_by_account_time")
