"""AccountsService against a real server."""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from tally_client import (
    AccountAlreadyExists,
    AccountTimeZoneUnknown,
    InvalidArgument,
    NotFound,
    RequestIdReused,
    TallyClient,
)
from tally_service import errors
from tally_service.db import Database, make_engine
from tests.support import query


def test_create_get_defaults(client: TallyClient, account_id: str) -> None:
    trial = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    created = client.create_account(
        account_id, email="ops@acme.test", display_name="Acme", trial_end_time=trial
    )
    assert (created.account_id, created.email, created.display_name) == (
        account_id,
        "ops@acme.test",
        "Acme",
    )
    assert (created.time_zone, created.currency, created.overdraft_limit) == ("UTC", "CREDIT", "0")
    assert created.trial_end_time.ToDatetime(tzinfo=UTC) == trial
    assert created.HasField("create_time")
    assert client.get_account(account_id) == created


def test_create_is_idempotent_and_ids_are_unique(client: TallyClient, account_id: str) -> None:
    first = client.create_account(account_id, time_zone="Asia/Kolkata", request_id=account_id)
    assert (
        client.create_account(account_id, time_zone="Asia/Kolkata", request_id=account_id) == first
    )
    with pytest.raises(RequestIdReused):
        client.create_account(account_id, time_zone="UTC", request_id=account_id)
    with pytest.raises(AccountAlreadyExists) as exists:
        client.create_account(account_id)
    assert exists.value.metadata["account_id"] == account_id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"account_id": ""}, "account.account_id"),
        ({"account_id": "has space"}, "account.account_id"),
        ({"account_id": "x" * 65}, "account.account_id"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        # Files zoneinfo loads that are not IANA zones (and PostgreSQL does not know).
        ({"time_zone": "posixrules"}, "time_zone"),
        ({"time_zone": "localtime"}, "time_zone"),
        ({"time_zone": "right/UTC"}, "time_zone"),
        ({"time_zone": "posix/Europe/Paris"}, "time_zone"),
        ({"currency": "usd"}, "currency"),
        ({"overdraft_limit": "-1"}, "account.overdraft_limit"),
        ({"overdraft_limit": "0.0000001"}, "account.overdraft_limit"),
        ({"email": "not-an-email"}, "email"),
    ],
)
def test_create_validation(
    client: TallyClient, account_id: str, kwargs: dict[str, str], field: str
) -> None:
    args = {"account_id": account_id, **kwargs}
    with pytest.raises(InvalidArgument) as info:
        client.create_account(**args)  # type: ignore[arg-type]
    assert info.value.reason == "VALIDATION_FAILED"
    assert info.value.field_violations[0][0] == field
    if args["account_id"] == account_id:
        with pytest.raises(NotFound):
            client.get_account(account_id)


def test_update_with_field_mask(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id, email="a@b.test", display_name="Before")
    updated = client.update_account(account_id, display_name="After", overdraft_limit="2.5")
    assert (updated.email, updated.display_name, updated.overdraft_limit) == (
        "a@b.test",
        "After",
        "2.5",
    )
    assert updated.update_time.ToDatetime() >= updated.create_time.ToDatetime()
    assert client.get_balance(account_id).overdraft_limit == "2.5"
    assert (
        client.update_account(account_id, time_zone="America/Los_Angeles").display_name == "After"
    )
    with pytest.raises(InvalidArgument):
        client.update_account(account_id, time_zone="Nowhere/Else")
    with pytest.raises(InvalidArgument) as empty:
        client.update_account(account_id)
    assert empty.value.field_violations[0][0] == "update_mask"
    with pytest.raises(NotFound):
        client.update_account("missing-account", display_name="x")


def test_update_accepts_the_deprecated_name_path(client: TallyClient, account_id: str) -> None:
    """Account.name became display_name (same field number); the mask path "name" still
    updates it."""
    from google.protobuf import field_mask_pb2

    from tally.v1 import account_pb2, accounts_pb2

    client.create_account(account_id, display_name="Before")
    request = accounts_pb2.UpdateAccountRequest(
        request_id=f"u-{account_id}",
        account=account_pb2.Account(account_id=account_id, display_name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )
    response = client.stubs.accounts.UpdateAccount(request, timeout=5)
    assert response.account.display_name == "Renamed"
    assert client.get_account(account_id).display_name == "Renamed"
    # The same field number on the wire: a message of the earlier shape reads the same.
    assert account_pb2.Account.DESCRIPTOR.fields_by_name["display_name"].number == 3


def test_update_rejects_immutable_paths(client: TallyClient, account_id: str) -> None:
    from google.protobuf import field_mask_pb2

    from tally.v1 import account_pb2, accounts_pb2

    client.create_account(account_id)
    request = accounts_pb2.UpdateAccountRequest(
        request_id=f"u-{account_id}",
        account=account_pb2.Account(account_id=account_id, currency="USD"),
        update_mask=field_mask_pb2.FieldMask(paths=["currency"]),
    )
    with pytest.raises(Exception) as info:
        client.stubs.accounts.UpdateAccount(request, timeout=5)
    assert "currency" in str(info.value)
    assert client.get_account(account_id).currency == "CREDIT"


def test_list_accounts_paginates(client: TallyClient) -> None:
    prefix = "list-" + datetime.now(UTC).strftime("%H%M%S%f")
    ids = [f"{prefix}-{i:02d}" for i in range(7)]
    for account in ids:
        client.create_account(account)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = client.list_accounts(page_size=3, page_token=token)
        assert len(page.accounts) <= 3
        seen += [a.account_id for a in page.accounts]
        token = page.next_page_token
        pages += 1
        if not token:
            break
    assert seen == sorted(seen)
    assert [s for s in seen if s.startswith(prefix)] == ids
    with pytest.raises(InvalidArgument) as negative:
        client.list_accounts(page_size=-1)
    assert negative.value.field_violations[0][0] == "page_size"
    with pytest.raises(InvalidArgument) as bad_token:
        client.list_accounts(page_token="garbage!")
    assert bad_token.value.field_violations[0][0] == "page_token"
    assert len(client.list_accounts(page_size=1000).accounts) <= 100


@pytest.mark.parametrize("zone", ["posixrules", "localtime", "right/UTC"])
def test_update_refuses_a_zone_that_is_not_a_place(
    client: TallyClient, account_id: str, zone: str
) -> None:
    """Such an account would fail every later call that needs its local time (a
    subscription's period, a usage day) as an internal error: the fuzzer found it."""
    client.create_account(account_id)
    with pytest.raises(InvalidArgument) as info:
        client.update_account(account_id, time_zone=zone)
    assert info.value.field_violations[0][0] == "time_zone"
    assert client.get_account(account_id).time_zone == "UTC"


def test_the_database_refuses_a_zone_it_does_not_know(own_database_url: str) -> None:
    """Behind the validation, tally_create_account and tally_update_account refuse a
    name PostgreSQL's time zone data lacks (zoneinfo may know one it does not: a newer
    zone, or a host file) as INVALID_ARGUMENT on time_zone, never an internal error."""

    def create(account_id: str, zone: str) -> dict[str, object]:
        return {
            "request_id": f"create-{account_id}",
            "fingerprint": b"c" * 32,
            "account_id": account_id,
            "email": "",
            "name": "",
            "time_zone": zone,
            "currency": "CREDIT",
            "overdraft_limit": 0,
            "trial_ends_at": None,
        }

    def update(zone: str, mask: list[str]) -> dict[str, object]:
        return {
            "request_id": f"update-{zone}-{len(mask)}",
            "fingerprint": b"u" * 32,
            "account_id": "tz-known",
            "mask": mask,
            "email": "",
            "name": "renamed",
            "time_zone": zone,
            "overdraft_limit": 0,
            "trial_ends_at": None,
        }

    async def main() -> None:
        db = Database(make_engine(own_database_url, pool_size=2))
        try:
            with pytest.raises(errors.InvalidArgument) as refused:
                await db.call("tally_create_account", create("tz-unknown", "posixrules"))
            assert refused.value.field == "time_zone"
            await db.call("tally_create_account", create("tz-known", "Asia/Kolkata"))
            with pytest.raises(errors.InvalidArgument) as refused:
                await db.call("tally_update_account", update("right/UTC", ["time_zone"]))
            assert refused.value.field == "time_zone"
            # A zone not in the mask is not looked at.
            answer, _ = await db.call("tally_update_account", update("right/UTC", ["name"]))
            assert (answer["account"]["name"], answer["account"]["time_zone"]) == (
                "renamed",
                "Asia/Kolkata",
            )
            async with db.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        text("SELECT account_id FROM accounts WHERE account_id LIKE 'tz-%'")
                    )
                ).all()
            assert [r[0] for r in rows] == ["tz-known"]
        finally:
            await db.engine.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("zone", ["posixrules", "Mars/Olympus"])
def test_a_stored_zone_nobody_knows_is_a_precondition_until_updated(
    client: TallyClient, account_id: str, database_url: str, zone: str
) -> None:
    """An account stored before its time zone was checked against zoneinfo's list and
    the database's data (the fuzzer's "posixrules") cannot answer anything in its local
    time. Each such call, whether the server or PostgreSQL finds it out, is
    FAILED_PRECONDITION ACCOUNT_TIME_ZONE_UNKNOWN naming the zone, never INTERNAL; the
    account's other calls go on, and UpdateAccount repairs it."""
    client.create_account(account_id)
    client.top_up(account_id, "100")
    product = client.upsert_product(f"P-{account_id}", "1").product_id
    query(
        database_url,
        "UPDATE accounts SET time_zone = :zone WHERE account_id = :account_id",
        zone=zone,
        account_id=account_id,
    )
    calls: dict[str, Callable[[], object]] = {
        "GetUsage": lambda: client.get_usage(account_id),
        "GetUsageSummary": lambda: client.get_usage_summary(account_id),
        "GetAccountSummary": lambda: client.get_account_summary(account_id),
        "ListUsageEvents": lambda: client.list_usage_events(account_id),
        "SetSubscription": lambda: client.set_subscription(
            account_id, "pro", "10", request_id=f"sub-{account_id}"
        ),
        "RecordUsage": lambda: client.record_usage(account_id, "e-1", product),
    }
    for name, call in calls.items():
        with pytest.raises(AccountTimeZoneUnknown) as info:
            call()
        assert info.value.metadata["time_zone"] == zone, name
    assert client.get_balance(account_id).balance == "100"
    client.debit(account_id, "1")  # no local time: unaffected
    client.update_account(account_id, time_zone="Europe/Paris")
    for call in calls.values():
        call()
    assert client.get_balance(account_id).balance == "108"
