"""The money SQL has one home: a migrated database runs exactly the functions in
`tally_service/sql/`, and changed files are applied again by `tally migrate`."""

import asyncio
import re

import asyncpg

from tally_service import sqlfiles
from tally_service.db import migrate

_BODY = re.compile(r"^CREATE OR REPLACE FUNCTION (\w+)\(.*?\bAS \$\$(.*?)\$\$;", re.M | re.S)
# Trigger functions live beside their triggers in the migrations.
_TRIGGER_FUNCTIONS = {
    "tally_refuse_change",
    "tally_stamp_caller",
    "tally_accounts_thresholds",  # 0010: pass movements to sql/65_thresholds.sql
    "tally_accounts_usage_days",  # 0011: usage_days beside usage_rollups
    "tally_events_references",  # 0013: the references of usage_events, per statement
    "tally_account_referenced",
    "tally_product_referenced",
    "tally_rollups_changed",  # 0015: pass rollup changes to sql/80_usage.sql
    "tally_entries_account",  # 0017: entries' accounts, unless their writer checked them
}


def _file_bodies() -> dict[str, str]:
    bodies: dict[str, str] = {}
    for f in sqlfiles.files():
        for name, body in _BODY.findall(f.text):
            assert name not in bodies, f"{name} is defined twice"
            bodies[name] = body
    return bodies


async def _database_functions(url: str) -> tuple[dict[str, str], str | None]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, p.prosrc FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' AND p.proname LIKE 'tally\\_%'"
        )
        checksum = await sqlfiles.applied_checksum(conn)
    finally:
        await conn.close()
    return {r["proname"]: r["prosrc"] for r in rows}, checksum


def test_migrated_functions_equal_the_files(database_url: str) -> None:
    functions, checksum = asyncio.run(_database_functions(database_url))
    files = _file_bodies()
    assert set(functions) - _TRIGGER_FUNCTIONS == set(files)
    for name, body in files.items():
        assert functions[name] == body, f"{name} differs from its file"
    assert checksum == sqlfiles.checksum()
    assert set(sqlfiles.signatures()) == set(files)


def test_changed_files_are_applied_again(admin_url: str) -> None:
    from tests.conftest import new_database

    url = new_database(admin_url)

    async def tamper() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "CREATE OR REPLACE FUNCTION tally_default_priority(p_type text) "
                "RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 99 $$"
            )
            await conn.execute(
                "CREATE FUNCTION tally_stale() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$"
            )
            await conn.execute("UPDATE tally_sql_files SET checksum = 'old'")
        finally:
            await conn.close()

    asyncio.run(tamper())
    migrate(url)
    functions, checksum = asyncio.run(_database_functions(url))
    assert "tally_stale" not in functions
    assert functions["tally_default_priority"] == _file_bodies()["tally_default_priority"]
    assert checksum == sqlfiles.checksum()


async def _type_attributes(url: str, name: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT a.attname FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid "
            "WHERE t.typname = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            name,
        )
    finally:
        await conn.close()
    return [r["attname"] for r in rows]


def test_usage_items_are_the_records_tally_record_usage_takes(database_url: str) -> None:
    """The driver sends a UsageItem as a tally_usage_event record, field by position."""
    from tally_service.db import UsageItem

    attributes = asyncio.run(_type_attributes(database_url, "tally_usage_event"))
    assert attributes == list(UsageItem._fields)
    assert sqlfiles.signatures()["tally_record_usage"] == ("p_events",)
