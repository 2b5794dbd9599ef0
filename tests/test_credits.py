"""CreditsService against a real server: success paths, error paths, idempotency, expiry."""

import time
import uuid
from typing import Any

import grpc
import pytest

from tally.v1 import credits_pb2, ledger_pb2
from tally_client import (
    AlreadyExists,
    FailedPrecondition,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    RequestIdReused,
    ReservationNotPending,
    TallyClient,
)
from tests.support import assert_consistent


def test_balance_of_new_account(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id, currency="USD")
    balance = client.get_balance(account_id)
    assert (balance.balance, balance.reserved, balance.available) == ("0", "0", "0")
    assert balance.currency == "USD"
    assert balance.overdraft_limit == "0"
    assert not balance.auto_reload.enabled
    assert balance.HasField("update_time")


def test_top_up_debit_and_balance(client: TallyClient, funded: str) -> None:
    entry = client.debit(funded, "2.95", description="PAN-Plus", reference="tx-1")
    assert entry.type == ledger_pb2.ENTRY_TYPE_DEBIT
    assert (entry.amount, entry.balance_after) == ("-2.95", "97.05")
    assert (entry.description, entry.reference) == ("PAN-Plus", "tx-1")
    balance = client.get_balance(funded)
    assert (balance.balance, balance.reserved, balance.available) == ("97.05", "0", "97.05")
    assert_consistent(client, funded)


def test_reserve_capture_partial_releases_rest(client: TallyClient, funded: str) -> None:
    hold = client.reserve(funded, "10", ttl_seconds=60, reference="job-1", metadata={"k": "v"})
    assert hold.status == credits_pb2.RESERVATION_STATUS_PENDING
    assert (hold.amount, hold.captured_amount) == ("10", "0")
    assert hold.expire_time.seconds - hold.create_time.seconds in (59, 60)
    balance = client.get_balance(funded)
    assert (balance.balance, balance.reserved, balance.available) == ("100", "10", "90")

    captured = client.capture(hold.reservation_id, "7.5", description="job done")
    assert captured.reservation.status == credits_pb2.RESERVATION_STATUS_CAPTURED
    assert captured.reservation.captured_amount == "7.5"
    assert captured.entry.amount == "-7.5"
    assert captured.entry.balance_after == "92.5"
    assert captured.entry.reservation_id == hold.reservation_id
    assert captured.entry.reference == "job-1"
    assert dict(captured.entry.metadata) == {"k": "v"}
    balance = client.get_balance(funded)
    assert (balance.balance, balance.reserved, balance.available) == ("92.5", "0", "92.5")
    assert_consistent(client, funded)


def test_capture_full_by_default_and_release(client: TallyClient, funded: str) -> None:
    hold = client.reserve(funded, "3")
    assert client.capture(hold.reservation_id).entry.amount == "-3"
    other = client.reserve(funded, "4")
    released = client.release(other.reservation_id)
    assert released.status == credits_pb2.RESERVATION_STATUS_RELEASED
    assert released.HasField("finalize_time")
    assert client.get_balance(funded).available == "97"
    assert client.get_reservation(other.reservation_id).status == (
        credits_pb2.RESERVATION_STATUS_RELEASED
    )
    assert_consistent(client, funded)


def test_capture_errors(client: TallyClient, funded: str) -> None:
    hold = client.reserve(funded, "5")
    with pytest.raises(InvalidArgument) as too_much:
        client.capture(hold.reservation_id, "5.000001")
    assert too_much.value.reason == "CAPTURE_EXCEEDS_HOLD"
    assert too_much.value.field_violations[0][0] == "amount"
    with pytest.raises(InvalidArgument):
        client.capture(hold.reservation_id, "0")
    client.release(hold.reservation_id)
    with pytest.raises(ReservationNotPending) as after_release:
        client.capture(hold.reservation_id)
    assert after_release.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert after_release.value.metadata["status"] == "released"
    with pytest.raises(ReservationNotPending):
        client.release(hold.reservation_id)
    with pytest.raises(NotFound) as missing:
        client.capture(str(uuid.uuid4()))
    assert missing.value.reason == "RESERVATION_NOT_FOUND"
    with pytest.raises(InvalidArgument) as malformed:
        client.capture("not-a-uuid")
    assert malformed.value.field_violations[0][0] == "reservation_id"
    assert_consistent(client, funded)


def test_insufficient_credits(client: TallyClient, funded: str) -> None:
    client.reserve(funded, "60")
    with pytest.raises(InsufficientCredits) as info:
        client.reserve(funded, "40.000001")
    err = info.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "INSUFFICIENT_CREDITS"
    assert err.metadata["available"] == "40"
    assert err.metadata["requested"] == "40.000001"
    with pytest.raises(InsufficientCredits):
        client.debit(funded, "41")
    client.debit(funded, "40")
    assert client.get_balance(funded).available == "0"
    assert_consistent(client, funded)


def test_overdraft_limit(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id, overdraft_limit="5")
    client.debit(account_id, "3")
    client.reserve(account_id, "2")
    with pytest.raises(InsufficientCredits):
        client.debit(account_id, "0.000001")
    balance = client.get_balance(account_id)
    assert (balance.balance, balance.reserved, balance.available) == ("-3", "2", "-5")
    assert_consistent(client, account_id)


def test_adjust_signed_with_reason(client: TallyClient, funded: str) -> None:
    entry = client.adjust(funded, "-150", "refund clawback", reference="TICKET-9")
    assert entry.type == ledger_pb2.ENTRY_TYPE_ADJUSTMENT
    assert (entry.amount, entry.balance_after, entry.description) == (
        "-150",
        "-50",
        "refund clawback",
    )
    # Adjustments may take available credit below the overdraft limit; debits may not.
    with pytest.raises(InsufficientCredits):
        client.debit(funded, "1")
    assert client.adjust(funded, "50.5", "goodwill").balance_after == "0.5"
    with pytest.raises(InvalidArgument) as no_reason:
        client.adjust(funded, "1", "  ")
    assert no_reason.value.field_violations[0][0] == "reason"
    assert_consistent(client, funded)


@pytest.mark.parametrize(
    ("amount", "description"),
    [
        ("", "required"),
        ("-1", "negative"),
        ("0", "zero"),
        ("1.0000001", "fractional"),
        ("1e2", "decimal"),
        ("abc", "decimal"),
        ("1000000000.5", "at most"),
    ],
)
def test_bad_amounts(client: TallyClient, funded: str, amount: str, description: str) -> None:
    stub = client.stubs.credits
    key = str(uuid.uuid4())
    calls: list[tuple[Any, Any]] = [
        (stub.TopUp, credits_pb2.TopUpRequest(request_id=key, account_id=funded, amount=amount)),
        (stub.Debit, credits_pb2.DebitRequest(request_id=key, account_id=funded, amount=amount)),
        (
            stub.Reserve,
            credits_pb2.ReserveRequest(request_id=key, account_id=funded, amount=amount),
        ),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "amount" in info.value.details()
        assert description in info.value.details()
    assert client.get_balance(funded).balance == "100"
    assert client.list_entries(funded).entries[0].sequence == 1


def test_bad_requests(client: TallyClient, funded: str) -> None:
    stub = client.stubs.credits
    with pytest.raises(grpc.RpcError) as no_key:
        stub.TopUp(credits_pb2.TopUpRequest(account_id=funded, amount="1"), timeout=5)
    assert no_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in no_key.value.details()
    with pytest.raises(NotFound) as unknown:
        client.top_up("no-such-account", "1")
    assert unknown.value.reason == "ACCOUNT_NOT_FOUND"
    with pytest.raises(NotFound):
        client.get_balance("no-such-account")
    with pytest.raises(InvalidArgument):
        client.get_balance("bad id with spaces")
    with pytest.raises(InvalidArgument) as ttl:
        client.reserve(funded, "1", ttl_seconds=7 * 24 * 3600 + 1)
    assert ttl.value.field_violations[0][0] == "ttl_seconds"
    with pytest.raises(InvalidArgument):
        client.top_up(funded, "1", reference="x" * 257)
    with pytest.raises(InvalidArgument):
        client.top_up(funded, "1", metadata={"blob": "x" * 20000})
    assert client.get_balance(funded).balance == "100"


def test_retries_return_first_result_and_move_money_once(client: TallyClient, funded: str) -> None:
    first = client.top_up(funded, "5", request_id="topup-" + funded)
    again = client.top_up(funded, "5", request_id="topup-" + funded)
    assert again == first

    debit = client.debit(funded, "1", request_id="debit-" + funded)
    assert client.debit(funded, "1", request_id="debit-" + funded) == debit

    hold = client.reserve(funded, "10", request_id="hold-" + funded)
    assert client.reserve(funded, "10", request_id="hold-" + funded) == hold

    captured = client.capture(hold.reservation_id, "4", request_id="cap-" + funded)
    assert client.capture(hold.reservation_id, "4", request_id="cap-" + funded) == captured
    # The stored Reserve response is the hold as it was placed, even after the capture.
    assert client.reserve(funded, "10", request_id="hold-" + funded) == hold

    other = client.reserve(funded, "1")
    released = client.release(other.reservation_id, request_id="rel-" + funded)
    assert client.release(other.reservation_id, request_id="rel-" + funded) == released

    adjusted = client.adjust(funded, "-1", "fix", request_id="adj-" + funded)
    assert client.adjust(funded, "-1", "fix", request_id="adj-" + funded) == adjusted

    assert client.get_balance(funded).balance == "99"  # 100 + 5 - 1 - 4 - 1
    assert len(list(client.iter_entries(funded))) == 5
    assert_consistent(client, funded)


def test_same_key_other_payload_is_already_exists(client: TallyClient, funded: str) -> None:
    key = "k-" + funded
    client.top_up(funded, "5", request_id=key)
    with pytest.raises(RequestIdReused) as payload:
        client.top_up(funded, "6", request_id=key)
    assert payload.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert payload.value.metadata["mismatch"] == "payload"
    with pytest.raises(RequestIdReused) as method:
        client.debit(funded, "5", request_id=key)
    assert method.value.metadata["mismatch"] == "method"
    assert method.value.metadata["original_method"] == "TopUp"
    assert isinstance(method.value, AlreadyExists)
    assert client.get_balance(funded).balance == "105"


def test_failed_request_leaves_no_trace_and_can_be_retried(
    client: TallyClient, account_id: str
) -> None:
    client.create_account(account_id)
    key = "retry-" + account_id
    with pytest.raises(InsufficientCredits):
        client.debit(account_id, "5", request_id=key)
    assert len(client.list_entries(account_id).entries) == 0
    client.top_up(account_id, "5")
    entry = client.debit(account_id, "5", request_id=key)
    assert entry.balance_after == "0"
    assert_consistent(client, account_id)


def test_expired_hold_stops_counting_at_once(client: TallyClient, funded: str) -> None:
    hold = client.reserve(funded, "100", ttl_seconds=1)
    assert client.get_balance(funded).available == "0"
    time.sleep(1.2)
    # Whether or not the sweeper ran yet, the hold no longer counts.
    balance = client.get_balance(funded)
    assert (balance.reserved, balance.available) == ("0", "100")
    assert client.get_reservation(hold.reservation_id).status == (
        credits_pb2.RESERVATION_STATUS_EXPIRED
    )
    with pytest.raises(ReservationNotPending) as info:
        client.capture(hold.reservation_id)
    assert info.value.metadata["status"] == "expired"
    assert isinstance(info.value, FailedPrecondition)
    client.reserve(funded, "100")
    assert_consistent(client, funded)


def test_sweeper_writes_down_expired_holds(client: TallyClient, funded: str) -> None:
    hold = client.reserve(funded, "1", ttl_seconds=1)
    deadline = time.monotonic() + 10
    # GetReservation does not catch up (VerifyAccount does): only the sweeper writes
    # the row down.
    while not client.get_reservation(hold.reservation_id).HasField("finalize_time"):
        assert time.monotonic() < deadline, "the sweeper did not write the hold down"
        time.sleep(0.2)
    reservation = client.get_reservation(hold.reservation_id)
    assert reservation.status == credits_pb2.RESERVATION_STATUS_EXPIRED
    assert reservation.finalize_time == reservation.expire_time
    assert_consistent(client, funded)
