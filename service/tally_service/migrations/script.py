"""Running a migration's SQL script."""

from alembic import op
from sqlalchemy.util import await_only


def run_script(sql: str) -> None:
    """Runs a multi-statement script (with $$-quoted function bodies) through the
    driver's simple query protocol, which SQLAlchemy's prepared statements do not use.
    It runs inside the migration's transaction."""
    driver_connection = op.get_bind().connection.driver_connection
    assert driver_connection is not None
    await_only(driver_connection.execute(sql))
