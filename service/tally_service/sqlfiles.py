"""The money SQL: `tally_service/sql/*.sql`, one file per concern, each holding the one
current `CREATE OR REPLACE` of its functions (pgledger's style). Migrations keep tables,
indexes and triggers (with their trigger functions); after them, `apply` installs these
files whenever their checksum differs from the one recorded in `tally_sql_files`.

`signatures` parses each function's parameter names, so the gateway (`db.Database.call`)
calls functions with named arguments (`tally_reserve(p_account_id => $3, …)`) and refuses
a call whose names do not match the function's parameters.
"""

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

# Applied in one transaction: every Tally function that is not a trigger function is
# dropped first (so a changed signature or a removed function leaves nothing behind),
# then the files run in name order with body checks off (as pg_dump does), so a
# function may call one defined in a later file.
_DROP_FUNCTIONS = r"""
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND p.proname LIKE 'tally\_%'
          AND p.prorettype <> 'trigger'::regtype
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END $$;
"""

_FUNCTION = re.compile(
    r"^CREATE OR REPLACE FUNCTION (?P<name>\w+)\((?P<params>.*?)\)\s*(?:RETURNS|\n)",
    re.M | re.S,
)
_LOCK_KEY = 0x7A11_5C1F  # pg_advisory_xact_lock key: one migrator at a time


@dataclass(frozen=True)
class SqlFile:
    name: str
    text: str


@cache
def files() -> tuple[SqlFile, ...]:
    folder = resources.files("tally_service").joinpath("sql")
    found = [
        SqlFile(entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return tuple(sorted(found, key=lambda f: f.name))


@cache
def checksum() -> str:
    digest = hashlib.sha256()
    for f in files():
        digest.update(f.name.encode() + b"\0" + f.text.encode() + b"\0")
    return digest.hexdigest()


@cache
def signatures() -> dict[str, tuple[str, ...]]:
    """Each function's parameter names, in order, from the files."""
    found: dict[str, tuple[str, ...]] = {}
    for f in files():
        for match in _FUNCTION.finditer(f.text):
            params = [p.strip() for p in match.group("params").split(",") if p.strip()]
            names = tuple(p.split()[0] for p in params)
            if match.group("name") in found:
                raise AssertionError(f"{match.group('name')} is defined twice in sql/")
            found[match.group("name")] = names
    return found


def script() -> str:
    """The whole apply script, for one transaction."""
    body = "\n".join(f"-- {f.name}\n{f.text}" for f in files())
    return (
        f"SELECT pg_advisory_xact_lock({_LOCK_KEY});\n"
        "SET LOCAL check_function_bodies = off;\n"
        f"{_DROP_FUNCTIONS}\n{body}\n"
        "INSERT INTO tally_sql_files (checksum) VALUES ('" + checksum() + "') "
        "ON CONFLICT (singleton) DO UPDATE SET checksum = EXCLUDED.checksum, "
        "applied_at = clock_timestamp();\n"
    )


async def applied_checksum(conn: Any) -> str | None:
    """The checksum recorded in the database (an asyncpg connection), or None."""
    value: str | None = await conn.fetchval("SELECT checksum FROM tally_sql_files")
    return value


async def apply(conn: Any) -> bool:
    """Installs the files on an asyncpg connection if they changed; True if it did."""
    if await applied_checksum(conn) == checksum():
        return False
    async with conn.transaction():
        await conn.execute(script())
    return True
