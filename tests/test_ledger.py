"""LedgerService: entries, filters, keyset pagination, verification, append-only."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally.v1 import ledger_pb2
from tally_client import InvalidArgument, NotFound, TallyClient
from tally_service.db import async_url


def test_entries_newest_first_with_seed_fields(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.top_up(
        account_id, "10", description="purchase", reference="pay_1", metadata={"plan": "pro"}
    )
    client.debit(account_id, "2.95", description="PAN-Plus")
    client.adjust(account_id, "-0.05", "rounding fix")
    entries = client.list_entries(account_id).entries
    assert [e.sequence for e in entries] == [3, 2, 1]
    assert [e.type for e in entries] == [
        ledger_pb2.ENTRY_TYPE_ADJUSTMENT,
        ledger_pb2.ENTRY_TYPE_DEBIT,
        ledger_pb2.ENTRY_TYPE_CREDIT,
    ]
    assert [(e.amount, e.balance_after) for e in entries] == [
        ("-0.05", "7"),
        ("-2.95", "7.05"),
        ("10", "10"),
    ]
    credit = entries[2]
    assert (credit.description, credit.reference) == ("purchase", "pay_1")
    assert dict(credit.metadata) == {"plan": "pro"}
    assert credit.request_id
    assert client.get_entry(credit.entry_id) == credit


def test_type_and_time_filters(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "5")
    client.debit(account_id, "1")
    client.top_up(account_id, "3")
    credits = client.list_entries(account_id, type="credit").entries
    assert [e.amount for e in credits] == ["3", "5"]
    debits = client.list_entries(account_id, type=ledger_pb2.ENTRY_TYPE_DEBIT).entries
    assert [e.amount for e in debits] == ["-1"]
    middle = client.list_entries(account_id).entries[1].create_time.ToDatetime(tzinfo=UTC)
    since = client.list_entries(account_id, start_time=middle).entries
    assert [e.sequence for e in since] == [3, 2]
    until = client.list_entries(account_id, end_time=middle).entries
    assert [e.sequence for e in until] == [1]
    future = datetime.now(UTC) + timedelta(days=1)
    assert not client.list_entries(account_id, start_time=future).entries
    with pytest.raises(InvalidArgument) as reversed_range:
        client.list_entries(account_id, start_time=future, end_time=middle)
    assert reversed_range.value.field_violations[0][0] == "start_time"


def test_keyset_pagination(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    for i in range(1, 13):
        client.top_up(account_id, str(i))
    first = client.list_entries(account_id, page_size=5)
    assert [e.sequence for e in first.entries] == [12, 11, 10, 9, 8]
    # Entries written between pages neither repeat nor shift the next page.
    client.top_up(account_id, "100")
    second = client.list_entries(account_id, page_size=5, page_token=first.next_page_token)
    assert [e.sequence for e in second.entries] == [7, 6, 5, 4, 3]
    third = client.list_entries(account_id, page_size=5, page_token=second.next_page_token)
    assert [e.sequence for e in third.entries] == [2, 1]
    assert third.next_page_token == ""
    assert len(list(client.iter_entries(account_id, page_size=4))) == 13
    assert len(client.list_entries(account_id).entries) == 13  # page_size 0 means 50


def test_page_errors(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    for _ in range(3):
        client.top_up(account_id, "1")
    token = client.list_entries(account_id, page_size=1).next_page_token
    with pytest.raises(InvalidArgument) as other_filters:
        client.list_entries(account_id, type="credit", page_size=1, page_token=token)
    assert "other filters" in other_filters.value.message
    for bad in ("%%%", "eyJ4IjoxfQ", token[:-3]):
        with pytest.raises(InvalidArgument) as info:
            client.list_entries(account_id, page_token=bad)
        assert info.value.field_violations[0][0] == "page_token"
    with pytest.raises(InvalidArgument):
        client.list_entries(account_id, page_size=-5)
    with pytest.raises(NotFound):
        client.list_entries("no-such-account")
    with pytest.raises(NotFound) as missing:
        client.get_entry(2**62)
    assert missing.value.reason == "ENTRY_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        client.get_entry(0)


def test_verify_reports_tampering(client: TallyClient, funded: str, database_url: str) -> None:
    client.reserve(funded, "3")
    report = client.verify_account(funded)
    assert report.consistent
    assert (report.stored_balance, report.ledger_balance, report.entry_count) == ("100", "100", 1)
    assert (report.stored_reserved, report.holds_reserved) == ("3", "3")

    async def tamper() -> None:
        engine = create_async_engine(async_url(database_url))
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE accounts SET balance = balance + 1 WHERE account_id = :a"),
                {"a": funded},
            )
        await engine.dispose()

    asyncio.run(tamper())
    report = client.verify_account(funded)
    assert not report.consistent
    assert any("ledger sum" in v for v in report.violations)
    with pytest.raises(NotFound):
        client.verify_account("no-such-account")


def test_ledger_is_append_only(client: TallyClient, funded: str, database_url: str) -> None:
    async def attempt(statement: str) -> str:
        engine = create_async_engine(async_url(database_url))
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement), {"a": funded})
        except Exception as exc:
            return str(exc)
        finally:
            await engine.dispose()
        return ""

    for statement in (
        "UPDATE ledger_entries SET amount = 1 WHERE account_id = :a",
        "DELETE FROM ledger_entries WHERE account_id = :a",
    ):
        assert "append-only" in asyncio.run(attempt(statement))
    assert client.verify_account(funded).consistent
