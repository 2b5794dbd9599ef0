"""The references of the two hot tables (migrations 0013 and 0017): ledger entries and
usage events point at rows that exist, and those rows stay, for every writer, as the
foreign keys they replace guaranteed. Checked on the database directly (no server)."""

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from tally_service.db import UsageItem


def _completed(account: str, event_id: str, product: str) -> UsageItem:
    """One completed event of quantity 1, as the servicer sends it."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return UsageItem(
        idx=0,
        account_id=account,
        event_id=event_id,
        product_id=product,
        endpoint="",
        status="completed",
        success=True,
        status_code=200,
        message="",
        quantity=1,
        credits=None,
        started_at=at,
        completed_at=at,
        processing_time_ms=0,
        request_metadata="{}",
        result_metadata="{}",
        webhook_url="",
        fingerprint=b"\x00",
    )


async def _new_account(conn: asyncpg.Connection, funded: bool = False) -> str:
    account = f"refs-{uuid.uuid4().hex[:10]}"
    await conn.execute(
        "SELECT tally_create_account($1, '\\x00', $2, '', '', 'UTC', 'CREDIT', 0, NULL)",
        f"create-{account}",
        account,
    )
    if funded:
        await conn.execute(
            "SELECT tally_move($1, '\\x00', 'TopUp', $2, 'credit', 1000000, '', '', '{}', "
            '\'{"type": "purchased"}\')',
            f"top-up-{account}",
            account,
        )
    return account


async def _setup(conn: asyncpg.Connection) -> tuple[str, str, int]:
    """An account with a charged usage event: (account, product, its entry id)."""
    account = await _new_account(conn, funded=True)
    product = f"{account}-product"
    await conn.execute(
        "SELECT tally_upsert_product($1, '\\x00', $2, '', 1000, false, 0)",
        f"product-{product}",
        product,
    )
    event = _completed(account, "e1", product)
    raw = await conn.fetchval("SELECT tally_record_usage($1)", [event])
    (result,) = json.loads(raw)["response"]
    assert isinstance(result, list), result
    entry_id = await conn.fetchval(
        "SELECT entry_id FROM usage_events WHERE account_id = $1 AND event_id = 'e1'", account
    )
    assert entry_id is not None
    return account, product, int(entry_id)


async def _refused(conn: asyncpg.Connection, statement: str, *args: object) -> str:
    """The SQLSTATE the statement fails with (rolled back either way), or ''."""
    try:
        async with conn.transaction():
            await conn.execute(statement, *args)
            raise _RolledBack
    except _RolledBack:
        return ""
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)


class _RolledBack(Exception):
    pass


_EVENT = (
    "INSERT INTO usage_events (account_id, event_id, product_id, status, success, quantity, "
    "credits, started_at, entry_id, fingerprint) "
    "VALUES ($1, $2, $3, 'completed', true, 1, $4, now(), $5, '\\x00')"
)
_ENTRY = (
    "INSERT INTO ledger_entries (account_id, sequence, entry_type, amount, balance_after, "
    "request_id) VALUES ($1, 1000000, 'credit', 1, 1, 'refs')"
)


def test_references_are_checked_for_every_writer(database_url: str) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            account, product, entry = await _setup(conn)
            # A row that points at nothing is refused (23503), as by a foreign key.
            assert await _refused(conn, _ENTRY, "no-such-account") == "23503"
            assert await _refused(conn, _ENTRY, account) == ""
            # Several rows in one statement, one of them pointing at nothing.
            rows = (
                "INSERT INTO ledger_entries (account_id, sequence, entry_type, amount, "
                "balance_after, request_id) SELECT a, 1000000 + n, 'credit', 1, 1, 'refs' "
                "FROM unnest($1::text[]) WITH ORDINALITY AS t (a, n)"
            )
            assert await _refused(conn, rows, [account, account]) == ""
            assert await _refused(conn, rows, [account, "no-such", account]) == "23503"
            assert await _refused(conn, _EVENT, "no-such", "x", product, 0, None) == "23503"
            assert await _refused(conn, _EVENT, account, "x", "no-such", 0, None) == "23503"
            assert await _refused(conn, _EVENT, account, "x", product, 5, 10**15) == "23503"
            assert await _refused(conn, _EVENT, account, "x", product, 0, None) == ""
            update = "UPDATE usage_events SET entry_id = $2 WHERE account_id = $1"
            assert await _refused(conn, update, account, 10**15) == "23503"
            # The referenced rows stay.
            for statement, key in (
                ("DELETE FROM accounts WHERE account_id = $1", account),
                (
                    "UPDATE accounts SET account_id = account_id || 'x' WHERE account_id = $1",
                    account,
                ),
                ("DELETE FROM products WHERE product_id = $1", product),
                (
                    "UPDATE products SET product_id = product_id || 'x' WHERE product_id = $1",
                    product,
                ),
            ):
                assert await _refused(conn, statement, key) == "23503", statement
            assert await _refused(conn, "TRUNCATE products") == "23503"
            # An unreferenced product may go.
            assert await _refused(conn, "DELETE FROM products WHERE product_id = 'none'") == ""
            assert entry > 0
        finally:
            await conn.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("caller", ["", "alice"])
def test_every_entry_is_stamped_with_the_caller(database_url: str, caller: str) -> None:
    """The caller stamp (a trigger with a WHEN) still covers an entry written without it."""

    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            account, _, _ = await _setup(conn)
            stamped: dict[str, object] = {}
            try:
                async with conn.transaction():  # rolled back: the chain stays whole
                    await conn.execute("SELECT set_config('tally.caller', $1, true)", caller)
                    stamped = json.loads(
                        await conn.fetchval(
                            "INSERT INTO ledger_entries (account_id, sequence, entry_type, "
                            "amount, balance_after, request_id, metadata) "
                            "VALUES ($1, 1000000, 'credit', 1, 1, 'refs', '{\"a\": 1}') "
                            "RETURNING metadata",
                            account,
                        )
                    )
                    raise _RolledBack
            except _RolledBack:
                pass
            expected: dict[str, object] = {"a": 1}
            if caller:
                expected["caller"] = caller
            assert stamped == expected
        finally:
            await conn.close()

    asyncio.run(scenario())


def _debit(account: str, key: str) -> dict[str, object]:
    return {
        "f": "tally_move",
        "caller": "",
        "a": {
            "request_id": f"{account}-{key}",
            "fingerprint": "00",
            "method": "Debit",
            "account_id": account,
            "type": "debit",
            "amount": -1000,
            "description": "",
            "reference": "",
            "metadata": "{}",
            "grant": None,
        },
    }


def test_entries_of_writers_that_checked_leave_no_gap(database_url: str) -> None:
    """Each function that writes entries tells the ledger_entries_account trigger that it
    checked their accounts (tally.references_checked) for its own INSERT only: a raw insert
    later in the same transaction is checked as the foreign key checked it."""

    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            account, product, _ = await _setup(conn)
            other = await _new_account(conn, funded=True)
            held = [
                json.loads(
                    await conn.fetchval(
                        "SELECT tally_reserve($1, '\\x00', $2, 1000, 300, '', '{}')::text",
                        f"{other}-r{i}",
                        other,
                    )
                )["response"]["reservation"]["reservation_id"]
                for i in range(2)
            ]
            captures = [
                {
                    "f": "tally_capture",
                    "caller": "",
                    "a": {
                        "request_id": f"{other}-c{i}",
                        "fingerprint": "00",
                        "reservation_id": h,
                        "amount": None,
                        "description": "",
                        "metadata": "{}",
                    },
                }
                for i, h in enumerate(held)
            ]
            expired = '{"type": "promotional", "expires_at": "2000-01-01T00:00:00Z"}'  # written off
            writers: list[tuple[str, tuple[object, ...]]] = [
                # tally_post_entry, one entry
                (
                    "SELECT tally_move($1, '\\x00', 'Debit', $2, 'debit', -1000, '', '', '{}', "
                    "NULL)",
                    (f"{account}-d", account),
                ),
                # tally_write_off: an expired grant, written off by the next lock
                (
                    "SELECT tally_move($1, '\\x00', 'TopUp', $2, 'credit', 1000, '', '', '{}', "
                    "$3::jsonb), tally_move($1 || '-2', '\\x00', 'Debit', $2, 'debit', -1, "
                    "'', '', '{}', NULL)",
                    (f"{account}-expiring", account, expired),
                ),
                # tally_debit_run (two debits of one account in a group)
                (
                    "SELECT tally_apply_group($1::jsonb)",
                    (json.dumps([_debit(account, "g1"), _debit(account, "g2")]),),
                ),
                # tally_hold_run (two captures of one account in a group)
                ("SELECT tally_apply_group($1::jsonb)", (json.dumps(captures),)),
            ]
            mark = "SELECT current_setting('tally.references_checked', true)"
            for statement, args in writers:
                before = await conn.fetchval("SELECT count(*) FROM ledger_entries")
                async with conn.transaction():
                    await conn.execute(statement, *args)
                    assert await conn.fetchval(mark) == "", statement  # set, then reset
                    assert await _refused(conn, _ENTRY, "no-such-account") == "23503", statement
                assert await conn.fetchval("SELECT count(*) FROM ledger_entries") > before
            # tally_record_usage
            async with conn.transaction():
                raw = await conn.fetchval(
                    "SELECT tally_record_usage($1)",
                    [_completed(account, "e2", product)],
                )
                assert isinstance(json.loads(raw)["response"][0], list), raw
                assert await conn.fetchval(mark) == ""
                assert await _refused(conn, _ENTRY, "no-such-account") == "23503"
                assert await _refused(conn, _ENTRY, account) == ""
            # Every writer wrote, and the chains are whole.
            for acct in (account, other):
                chain = await conn.fetchrow(
                    "SELECT a.balance, a.last_sequence, sum(e.amount) AS total, "
                    "count(*) AS n, max(e.sequence) AS last, "
                    "count(*) FILTER (WHERE e.description = 'expired') AS expired "
                    "FROM accounts a JOIN ledger_entries e USING (account_id) "
                    "WHERE a.account_id = $1 GROUP BY a.account_id",
                    acct,
                )
                assert chain["total"] == chain["balance"], dict(chain)
                assert chain["n"] == chain["last"] == chain["last_sequence"], dict(chain)
                assert chain["expired"] == (1 if acct == account else 0), dict(chain)
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_a_failed_writer_leaves_the_check_on(database_url: str) -> None:
    """A writer whose INSERT fails after it set tally.references_checked: rolling back to
    the savepoint takes the marker back too, so the next raw insert is checked."""

    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            account = await _new_account(conn, funded=True)
            async with conn.transaction():
                failed = ""
                try:
                    async with conn.transaction():
                        # The next entry's sequence is taken: tally_post_entry's INSERT
                        # fails with the marker on.
                        await conn.execute(
                            "UPDATE accounts SET last_sequence = last_sequence - 1 "
                            "WHERE account_id = $1",
                            account,
                        )
                        await conn.execute(
                            "SELECT tally_post_entry($1, 'credit', 1, 0, '', '', '{}', 'x', "
                            "NULL, NULL, NULL, false)",
                            account,
                        )
                except asyncpg.PostgresError as exc:
                    failed = str(exc.sqlstate)
                assert failed == "23505"
                assert await _refused(conn, _ENTRY, "no-such-account") == "23503"
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_an_account_named_by_entries_stays(database_url: str) -> None:
    """An account with ledger entries (and no usage event) is neither deleted nor
    renamed, accounts are not truncated, and a raw entry locks its account against a
    concurrent delete until it commits, as the foreign key did."""

    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        other = await asyncpg.connect(database_url)
        try:
            account = await _new_account(conn, funded=True)
            for statement in (
                "DELETE FROM accounts WHERE account_id = $1",
                "UPDATE accounts SET account_id = account_id || 'x' WHERE account_id = $1",
            ):
                assert await _refused(conn, statement, account) == "23503", statement
            assert await _refused(conn, "TRUNCATE accounts CASCADE") == "23503"
            # An account with no entries may go (rolled back).
            bare = await _new_account(conn)
            assert await _refused(conn, "DELETE FROM accounts WHERE account_id = $1", bare) == ""
            # A raw entry not yet committed holds its account: a delete waits for it.
            await other.execute("SET lock_timeout = '200ms'")
            try:
                async with conn.transaction():  # rolled back: the chain stays whole
                    await conn.execute(_ENTRY.replace("1000000", "1"), bare)
                    delete = "DELETE FROM accounts WHERE account_id = $1"
                    assert await _refused(other, delete, bare) == "55P03"
                    raise _RolledBack
            except _RolledBack:
                pass
        finally:
            await other.close()
            await conn.close()

    asyncio.run(scenario())


def test_recorded_usage_holds_its_products_and_leaves_the_check_on(database_url: str) -> None:
    """tally_record_usage skips usage_events_references for its own write (migration 0018):
    it holds its products FOR KEY SHARE until it commits, so a product it is recording
    against cannot be deleted under it, and every later insert of the transaction is
    checked again."""

    async def scenario() -> None:
        conn = await asyncpg.connect(database_url)
        other = await asyncpg.connect(database_url)
        try:
            account, product, _ = await _setup(conn)
            fresh = f"{product}-fresh"
            await conn.execute(
                "SELECT tally_upsert_product($1, '\\x00', $2, '', 1000, false, 0)",
                f"product-{fresh}",
                fresh,
            )
            event = _completed(account, "e2", fresh)
            async with conn.transaction():
                raw = await conn.fetchval("SELECT tally_record_usage($1)", [event])
                (result,) = json.loads(raw)["response"]
                assert isinstance(result, list), result
                # Still checked after the function, in the same transaction.
                assert await _refused(conn, _EVENT, account, "x", "no-such", 0, None) == "23503"
                # The product is held: a delete waits for the recording transaction.
                await other.execute("SET lock_timeout = '100ms'")
                assert (
                    await _refused(other, "DELETE FROM products WHERE product_id = $1", fresh)
                    == "55P03"
                )
            # Committed: the product is referenced and stays.
            assert (
                await _refused(other, "DELETE FROM products WHERE product_id = $1", fresh)
                == "23503"
            )
        finally:
            await other.close()
            await conn.close()

    asyncio.run(scenario())
