"""No input is an internal error (DESIGN.md 11): forged page tokens, extreme timestamps,
huge values and signed amounts each get INVALID_ARGUMENT naming the field."""

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from tally.v1 import (
    account_pb2,
    accounts_pb2,
    credits_pb2,
    ledger_pb2,
    metering_pb2,
)
from tally_client import TallyClient
from tally_service import pagination
from tally_service.errors import InvalidArgument as InvalidArgumentError
from tests.conftest import ServerProcess
from tests.rpc import Outcome, invoke, message_class, method
from tests.support import assert_consistent


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as c:
        yield c


def assert_invalid(outcome: Outcome, field: str) -> None:
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert field in outcome.fields(), (outcome.fields(), outcome.details)


def forged(key: Any, filters: Any) -> str:
    body = json.dumps({"k": key, "f": pagination._digest(filters)}).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


FORGED_KEYS: list[Any] = [
    10**30,
    2**63,
    -1,
    0,
    True,
    1.5,
    None,
    "x",
    "",
    "\x00",
    "\ud800",
    "9" * 5000,
    [],
    [1, 2, 3],
    ["a", "b", "c", "d", "e"],
    {"a": 1},
    [[[[[]]]]],
    ["0001-01-01T00:00:00", "not-a-uuid"],
    ["9999-12-31T23:59:59+00:00", "00000000-0000-0000-0000-000000000000"],
    ["2026-01-01T00:00:00+00:00", "e", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59+00:00"],
    ["2026-01-01T00:00:00", "e", "2026-01-01T00:00:00", "2026-01-02T00:00:00"],
    [True, 1, None, 2**63],
]
RAW_TOKENS = ["%%%", "e30", "W10", "bnVsbA", "a" * 100_000, "WwAAAA", "[" * 3000]


def list_requests(account_id: str) -> list[tuple[str, Any, Any]]:
    """(method, request without token, the filters its token is issued for)."""
    return [
        ("ListAccounts", accounts_pb2.ListAccountsRequest(), "accounts"),
        ("ListProducts", metering_pb2.ListProductsRequest(), "products"),
        (
            "ListEntries",
            ledger_pb2.ListEntriesRequest(account_id=account_id),
            [account_id, None, None, None],
        ),
        (
            "ListReloads",
            credits_pb2.ListReloadsRequest(account_id=account_id),
            ["reloads", account_id],
        ),
        (
            "ListReservations",
            credits_pb2.ListReservationsRequest(account_id=account_id),
            ["reservations", account_id, None],
        ),
        (
            "ListUsageEvents",
            metering_pb2.ListUsageEventsRequest(account_id=account_id),
            [account_id, "0", "None", "None", ""],
        ),
    ]


def test_forged_page_tokens_are_invalid_argument(
    client: TallyClient, channel: grpc.Channel, account_id: str
) -> None:
    client.create_account(account_id)
    for name, request, filters in list_requests(account_id):
        tokens = [forged(k, filters) for k in FORGED_KEYS] + RAW_TOKENS
        for token in tokens:
            request.page_token = token
            outcome = invoke(channel, method(name), request)
            if outcome.ok:
                continue  # a forged key that is a valid key is a valid page
            assert_invalid(outcome, "page_token")
            assert outcome.size() < 2000


def test_pagination_decode_checks_kinds() -> None:
    def decode(key: Any, *kinds: pagination.Kind) -> Any:
        return pagination.decode(pagination.encode(key, "f"), "f", *kinds)

    assert decode(5, pagination.integer) == (5,)
    assert decode(2**63 - 1, pagination.integer) == (2**63 - 1,)
    for bad in (2**63, 0, True, 1.0, "5", [5]):
        with pytest.raises(InvalidArgumentError):
            decode(bad, pagination.integer)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    uid = "12345678-1234-1234-1234-123456789abc"
    assert decode([when.isoformat(), uid], pagination.instant, pagination.uuid_text) == (
        when,
        uid,
    )
    for bad_pair in ([when.isoformat()], ["2026-01-01T00:00:00", uid], ["x", uid], [1, 2]):
        with pytest.raises(InvalidArgumentError):
            decode(bad_pair, pagination.instant, pagination.uuid_text)


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


EXTREMES = [
    timestamp_pb2.Timestamp(seconds=-62135596800),  # 0001-01-01T00:00:00Z
    timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999),  # 9999-12-31T23:59:59Z
    timestamp_pb2.Timestamp(seconds=253402300799),
    timestamp_pb2.Timestamp(seconds=-62135596801),  # below the protobuf minimum
    timestamp_pb2.Timestamp(seconds=2**62),
    timestamp_pb2.Timestamp(seconds=0, nanos=-1),
    ts(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ts(datetime(9998, 1, 1, tzinfo=UTC)),
]


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "Etc/GMT+12"])
def test_extreme_timestamps_are_invalid_argument(
    client: TallyClient, channel: grpc.Channel, account_id: str, zone: str
) -> None:
    client.create_account(account_id, time_zone=zone)
    for t in EXTREMES:
        for name, request in [
            ("GetUsage", metering_pb2.GetUsageRequest(account_id=account_id)),
            ("ListUsageEvents", metering_pb2.ListUsageEventsRequest(account_id=account_id)),
            ("ListEntries", ledger_pb2.ListEntriesRequest(account_id=account_id)),
            ("ExportUsageReport", metering_pb2.ExportUsageReportRequest(account_id=account_id)),
        ]:
            for field in ("start_time", "end_time"):
                r = type(request)()
                r.CopyFrom(request)
                if name == "ListEntries":
                    getattr(r, field).CopyFrom(t)
                    assert_invalid(invoke(channel, method(name), r), field)
                else:
                    getattr(r.time_range, field).CopyFrom(t)  # type: ignore[attr-defined]
                    assert_invalid(invoke(channel, method(name), r), f"time_range.{field}")
        top_up = credits_pb2.TopUpRequest(
            request_id=f"r-{account_id}-{t.seconds}", account_id=account_id, amount="1"
        )
        top_up.expire_time.CopyFrom(t)
        assert_invalid(invoke(channel, method("TopUp"), top_up), "expire_time")
        update = accounts_pb2.UpdateAccountRequest(
            request_id=f"u-{account_id}-{t.seconds}",
            account=account_pb2.Account(account_id=account_id),
            update_mask=field_mask_pb2.FieldMask(paths=["trial_end_time"]),
        )
        update.account.trial_end_time.CopyFrom(t)
        assert_invalid(invoke(channel, method("UpdateAccount"), update), "account.trial_end_time")
    # The bounds themselves are served, in every zone, by every read.
    lowest, highest = ts(datetime(1970, 1, 1, tzinfo=UTC)), ts(datetime(9997, 12, 31, tzinfo=UTC))
    for period in (1, 2, 3):
        usage = metering_pb2.GetUsageRequest(account_id=account_id, period=period)  # type: ignore[arg-type]
        usage.time_range.start_time.CopyFrom(lowest)
        usage.time_range.end_time.CopyFrom(ts(datetime(1975, 1, 1, tzinfo=UTC)))
        assert invoke(channel, method("GetUsage"), usage).ok
    usage = metering_pb2.GetUsageRequest(account_id=account_id, period=3)  # type: ignore[arg-type]
    usage.time_range.start_time.CopyFrom(ts(datetime(9990, 1, 1, tzinfo=UTC)))
    usage.time_range.end_time.CopyFrom(highest)
    assert invoke(channel, method("GetUsage"), usage).ok
    export = metering_pb2.ExportUsageReportRequest(account_id=account_id)
    export.time_range.start_time.CopyFrom(ts(datetime(9997, 6, 1, tzinfo=UTC)))
    export.time_range.end_time.CopyFrom(highest)
    assert invoke(channel, method("ExportUsageReport"), export).ok
    events = metering_pb2.ListUsageEventsRequest(account_id=account_id)
    events.time_range.end_time.CopyFrom(lowest)
    assert invoke(channel, method("ListUsageEvents"), events).ok
    early = metering_pb2.ListUsageEventsRequest(account_id=account_id)
    early.time_range.end_time.CopyFrom(ts(datetime(1970, 1, 3, tzinfo=UTC)))
    assert invoke(channel, method("ListUsageEvents"), early).ok
    update = accounts_pb2.UpdateAccountRequest(
        request_id=f"u-{account_id}-max",
        account=account_pb2.Account(account_id=account_id),
        update_mask=field_mask_pb2.FieldMask(paths=["trial_end_time"]),
    )
    update.account.trial_end_time.CopyFrom(highest)
    assert invoke(channel, method("UpdateAccount"), update).ok
    for name in ("GetAccount", "GetAccountSummary"):
        request = message_class(method(name).input_type)(account_id=account_id)
        assert invoke(channel, method(name), request).ok
    assert invoke(
        channel,
        method("GetUsageSummary"),
        metering_pb2.GetUsageSummaryRequest(account_id=account_id),
    ).ok


def test_huge_values_make_small_errors(channel: grpc.Channel, account_id: str) -> None:
    huge = "x" * 100_000
    cases: list[tuple[str, Any, str]] = [
        ("TopUp", credits_pb2.TopUpRequest(request_id="r", account_id="a", amount=huge), "amount"),
        (
            "CreateAccount",
            accounts_pb2.CreateAccountRequest(
                request_id="r", account=account_pb2.Account(account_id="a", time_zone=huge)
            ),
            "time_zone",
        ),
        (
            "UpdateAccount",
            accounts_pb2.UpdateAccountRequest(
                request_id="r",
                account=account_pb2.Account(account_id="a"),
                update_mask=field_mask_pb2.FieldMask(paths=[huge]),
            ),
            "update_mask",
        ),
        ("GetBalance", credits_pb2.GetBalanceRequest(account_id=huge), "account_id"),
        ("ListAccounts", accounts_pb2.ListAccountsRequest(page_token=huge), "page_token"),
    ]
    for name, request, field in cases:
        outcome = invoke(channel, method(name), request)
        assert_invalid(outcome, field)
        assert outcome.size() < 2000, (name, outcome.size())
        assert len(outcome.details) < 1200


@pytest.mark.parametrize("amount", ["+1", "+0.5", "-1", "-0", "+-1", "--1"])
def test_signed_amounts_are_refused_where_no_sign_is_allowed(
    client: TallyClient, channel: grpc.Channel, account_id: str, amount: str
) -> None:
    client.create_account(account_id)
    requests: list[tuple[str, Any]] = [
        ("TopUp", credits_pb2.TopUpRequest(request_id=f"t{account_id}", amount=amount)),
        ("Debit", credits_pb2.DebitRequest(request_id=f"d{account_id}", amount=amount)),
        ("Reserve", credits_pb2.ReserveRequest(request_id=f"v{account_id}", amount=amount)),
    ]
    for name, request in requests:
        request.account_id = account_id
        assert_invalid(invoke(channel, method(name), request), "amount")
    adjust = credits_pb2.AdjustRequest(
        request_id=f"a{account_id}", account_id=account_id, amount=amount, reason="r"
    )
    outcome = invoke(channel, method("Adjust"), adjust)
    if amount == "-1":
        assert outcome.ok
    else:
        assert_invalid(outcome, "amount")
    assert client.get_balance(account_id).balance == ("-1" if amount == "-1" else "0")
    assert_consistent(client, account_id)


def test_the_hold_of_a_long_job_is_finished_only_by_its_event(
    client: TallyClient, channel: grpc.Channel, account_id: str
) -> None:
    """Found by tests/test_fuzz.py: Capture or Release of a StartUsage hold, then
    FailUsage, was INTERNAL (a released hold with a captured amount), and CompleteUsage
    after a Release would have taken the reservation off twice. The hold now belongs to
    its event: Capture and Release refuse it, and the event finishes it."""
    client.create_account(account_id)
    client.top_up(account_id, "10")
    product = f"p-{account_id}"
    client.upsert_product(product, "1.5")
    other = client.reserve(account_id, "2", ttl_seconds=3600)  # another pending hold
    started = client.start_usage(account_id, f"job-{account_id}", product)
    hold = started.reservation.reservation_id
    for name, request in [
        ("Capture", credits_pb2.CaptureRequest(request_id=f"c-{hold}", reservation_id=hold)),
        ("Release", credits_pb2.ReleaseRequest(request_id=f"r-{hold}", reservation_id=hold)),
        (
            "Capture",
            credits_pb2.CaptureRequest(request_id=f"c2-{hold}", reservation_id=hold, amount="0.5"),
        ),
    ]:
        outcome = invoke(channel, method(name), request)
        assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, (name, outcome.details)
        assert outcome.status is not None and "RESERVATION_OF_USAGE_EVENT" in str(outcome.status)
    failed = client.fail_usage(account_id, f"job-{account_id}")
    assert failed.event.credits == "0"
    balance = client.get_balance(account_id)
    assert (balance.balance, balance.reserved) == ("10", "2")
    # A finished job's hold answers as any finished hold does.
    again = invoke(
        channel,
        method("Release"),
        credits_pb2.ReleaseRequest(request_id=f"r3-{hold}", reservation_id=hold),
    )
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION
    assert again.status is not None and "RESERVATION_NOT_PENDING" in str(again.status)
    client.release(other.reservation_id)
    assert_consistent(client, account_id)


@pytest.mark.parametrize("zone", ["localtime", "Factory", "posixrules", "EST5EDT", "US/Pacific"])
def test_every_accepted_time_zone_is_served(
    client: TallyClient, channel: grpc.Channel, account_id: str, zone: str
) -> None:
    """An account's zone is used by PostgreSQL (AT TIME ZONE) and by Python: a zone the
    API accepts must be one both know, or it is refused at the door."""
    created = invoke(
        channel,
        method("CreateAccount"),
        accounts_pb2.CreateAccountRequest(
            request_id=f"c-{account_id}",
            account=account_pb2.Account(account_id=account_id, time_zone=zone),
        ),
    )
    if not created.ok:
        assert_invalid(created, "time_zone")
        return
    client.top_up(account_id, "1")
    for period in (1, 2, 3):
        usage = metering_pb2.GetUsageRequest(account_id=account_id, period=period)  # type: ignore[arg-type]
        assert invoke(channel, method("GetUsage"), usage).ok
    for name in ("GetAccountSummary", "GetUsageSummary", "ListUsageEvents", "GetBalance"):
        request = message_class(method(name).input_type)(account_id=account_id)
        outcome = invoke(channel, method(name), request)
        assert outcome.ok, (name, outcome.code, outcome.details)
    export = metering_pb2.ExportUsageReportRequest(account_id=account_id)
    assert invoke(channel, method("ExportUsageReport"), export).ok


def test_one_events_overflowing_charge_fails_only_that_event(
    client: TallyClient, channel: grpc.Channel, account_id: str
) -> None:
    """DESIGN.md 9: a charge out of range (1e9 credits a unit x 1e9 units) rolled back
    the whole batch with it; now only that event is refused."""
    client.create_account(account_id, overdraft_limit="1000000000")
    client.top_up(account_id, "10")
    big, small = f"big-{account_id}", f"small-{account_id}"
    client.upsert_product(big, "1000000000")
    client.upsert_product(small, "1")

    def event(product: str, quantity: int) -> metering_pb2.UsageEvent:
        return metering_pb2.UsageEvent(
            account_id=account_id,
            event_id=f"{product}-{quantity}",
            product_id=product,
            quantity=quantity,
        )

    batch = metering_pb2.RecordUsageBatchRequest(
        events=[event(small, 1), event(big, 10**9), event(small, 2)]
    )
    for _ in range(2):  # and the same again: the recorded ones are duplicates
        outcome = invoke(channel, method("RecordUsageBatch"), batch)
        assert outcome.ok, (outcome.code, outcome.details)
        first, refused, third = outcome.response.results
        assert first.HasField("result") and third.HasField("result")
        assert refused.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "BALANCE_LIMIT" in str(refused.status)
    assert client.get_balance(account_id).balance == "7"
    single = invoke(
        channel, method("RecordUsage"), metering_pb2.RecordUsageRequest(event=event(big, 10**9))
    )
    assert single.code == grpc.StatusCode.FAILED_PRECONDITION
    assert_consistent(client, account_id)
