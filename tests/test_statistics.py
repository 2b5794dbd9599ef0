"""A new database's tables get their first statistics from the sweeper
(`sweeper.analyze_new_tables`): the plans that every session made on them while they
were empty are then made again (docs/benchmarks.md, "Plans made on empty tables")."""

import asyncio

from sqlalchemy import text

from tally_service.db import Database, make_engine
from tally_service.sweeper import analyze_new_tables

_RELTUPLES = text("SELECT relname, reltuples FROM pg_class WHERE relname IN ('accounts', 'holds')")


def test_a_grown_table_without_statistics_is_analysed_once(own_database_url: str) -> None:
    async def main() -> None:
        db = Database(make_engine(own_database_url, pool_size=2))
        try:
            async with db.engine.begin() as conn:
                # Autovacuum would otherwise race the test to the first ANALYZE.
                await conn.execute(text("ALTER TABLE accounts SET (autovacuum_enabled = false)"))
            assert "accounts" not in await analyze_new_tables(db)  # migrated: empty
            async with db.engine.begin() as conn:
                await conn.execute(
                    text(
                        "SELECT count(tally_create_account('stats-' || i, '\\x00', "
                        "'stats-' || i, '', '', 'UTC', 'CREDIT', 0, NULL)) "
                        "FROM generate_series(1, 2000) AS i"
                    )
                )
            # A sweeper tries a table once, even if it still has no statistics after
            # (a database user that may not analyse it): its name is not logged again.
            tried = {"accounts"}
            others = await analyze_new_tables(db, tried=tried)
            assert "accounts" not in others
            assert tried == {"accounts", *others}
            first = await analyze_new_tables(db)
            assert "accounts" in first
            assert "holds" not in first  # empty: left to autovacuum
            async with db.engine.connect() as conn:
                rows = (await conn.execute(_RELTUPLES)).all()
            reltuples = {str(name): float(n) for name, n in rows}
            assert reltuples["accounts"] >= 1000  # analysed (ANALYZE samples every row)
            assert reltuples["holds"] < 0  # never analysed
            assert "accounts" not in await analyze_new_tables(db)  # once
        finally:
            await db.engine.dispose()

    asyncio.run(main())
