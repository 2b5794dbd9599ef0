"""The money functions live in `tally_service/sql/`: this table records the checksum of
the files last applied, so `tally migrate` re-applies them exactly when they change
(see `tally_service.sqlfiles`).

Revision ID: 0007
Revises: 0006
"""

from tally_service.migrations.script import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE tally_sql_files (
            singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        """
    )


def downgrade() -> None:
    run_script("DROP TABLE tally_sql_files;")
