"""Request builders shared by the sync and async clients.

Each builder validates and converts its arguments once and returns an
:class:`Rpc`: which stub method to call, the request message, and how to pick the
result out of the response. The clients only add the call/retry loop, so a
mutating request is built (and its ``request_id`` chosen) exactly once and every
retry resends the very same message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from tally.v1 import account_pb2, accounts_pb2, credits_pb2, ledger_pb2

from .amounts import Amount, to_wire

ServiceName = Literal["accounts", "credits", "ledger"]
#: A ledger entry type: an ``EntryType`` value, or a name such as ``"credit"``,
#: ``"DEBIT"`` or ``"ENTRY_TYPE_ADJUSTMENT"``; ``None`` means all types.
EntryTypeArg = int | str | None

RespT = TypeVar("RespT", bound=Message)
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class Rpc(Generic[RespT, ResultT]):
    """One unary call, ready to send (and resend)."""

    service: ServiceName
    method: str
    request: Message
    unwrap: Callable[[RespT], ResultT]
    mutating: bool = False


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def _request_id(request_id: str | None) -> str:
    return new_request_id() if request_id is None else request_id


def to_timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    """A timezone-aware datetime as a protobuf Timestamp (naive ones are refused)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {dt.isoformat()}")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def to_struct(metadata: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A JSON-like mapping as a ``google.protobuf.Struct`` (``None`` stays unset)."""
    if metadata is None:
        return None
    s = struct_pb2.Struct()
    s.update(metadata)
    return s


def entry_type(value: EntryTypeArg) -> ledger_pb2.EntryType.ValueType:
    """Normalize an :data:`EntryTypeArg` to an ``EntryType`` value."""
    if value is None:
        return ledger_pb2.ENTRY_TYPE_UNSPECIFIED
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("ENTRY_TYPE_"):
            name = "ENTRY_TYPE_" + name
        try:
            return ledger_pb2.EntryType.Value(name)
        except ValueError:
            choices = ", ".join(
                k.removeprefix("ENTRY_TYPE_").lower()
                for k, _ in ledger_pb2.EntryType.items()
                if k != "ENTRY_TYPE_UNSPECIFIED"
            )
            raise ValueError(f"unknown entry type {value!r} (expected one of {choices})") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"entry type must be an EntryType value or name, not {value!r}")
    return ledger_pb2.EntryType.ValueType(value)


# --- AccountsService -------------------------------------------------------


def create_account(
    account_id: str,
    *,
    email: str = "",
    name: str = "",
    time_zone: str = "",
    currency: str = "",
    overdraft_limit: Amount | None = None,
    trial_end_time: datetime | None = None,
    request_id: str | None = None,
) -> Rpc[accounts_pb2.CreateAccountResponse, account_pb2.Account]:
    account = account_pb2.Account(
        account_id=account_id,
        email=email,
        name=name,
        time_zone=time_zone,
        currency=currency,
        overdraft_limit="" if overdraft_limit is None else to_wire(overdraft_limit),
    )
    if trial_end_time is not None:
        account.trial_end_time.CopyFrom(to_timestamp(trial_end_time))
    req = accounts_pb2.CreateAccountRequest(request_id=_request_id(request_id), account=account)
    return Rpc("accounts", "CreateAccount", req, lambda r: r.account, mutating=True)


def get_account(account_id: str) -> Rpc[accounts_pb2.GetAccountResponse, account_pb2.Account]:
    req = accounts_pb2.GetAccountRequest(account_id=account_id)
    return Rpc("accounts", "GetAccount", req, lambda r: r.account)


def update_account(
    account_id: str,
    *,
    email: str | None = None,
    name: str | None = None,
    time_zone: str | None = None,
    overdraft_limit: Amount | None = None,
    trial_end_time: datetime | None = None,
    clear_trial_end_time: bool = False,
    request_id: str | None = None,
) -> Rpc[accounts_pb2.UpdateAccountResponse, account_pb2.Account]:
    """Only the arguments that are not None go into the update mask.

    ``clear_trial_end_time=True`` removes the trial end (the mask names the
    field, the value is left unset). With nothing to update the request is still
    sent and the server answers INVALID_ARGUMENT (empty mask).
    """
    if clear_trial_end_time and trial_end_time is not None:
        raise ValueError("give either trial_end_time or clear_trial_end_time=True, not both")
    account = account_pb2.Account(account_id=account_id)
    paths: list[str] = []
    if email is not None:
        account.email = email
        paths.append("email")
    if name is not None:
        account.name = name
        paths.append("name")
    if time_zone is not None:
        account.time_zone = time_zone
        paths.append("time_zone")
    if overdraft_limit is not None:
        account.overdraft_limit = to_wire(overdraft_limit)
        paths.append("overdraft_limit")
    if trial_end_time is not None:
        account.trial_end_time.CopyFrom(to_timestamp(trial_end_time))
        paths.append("trial_end_time")
    elif clear_trial_end_time:
        paths.append("trial_end_time")
    req = accounts_pb2.UpdateAccountRequest(
        request_id=_request_id(request_id),
        account=account,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    return Rpc("accounts", "UpdateAccount", req, lambda r: r.account, mutating=True)


def list_accounts(
    page_size: int = 0, page_token: str = ""
) -> Rpc[accounts_pb2.ListAccountsResponse, accounts_pb2.ListAccountsResponse]:
    req = accounts_pb2.ListAccountsRequest(page_size=page_size, page_token=page_token)
    return Rpc("accounts", "ListAccounts", req, lambda r: r)


# --- CreditsService --------------------------------------------------------


def get_balance(account_id: str) -> Rpc[credits_pb2.GetBalanceResponse, credits_pb2.CreditBalance]:
    req = credits_pb2.GetBalanceRequest(account_id=account_id)
    return Rpc("credits", "GetBalance", req, lambda r: r.balance)


def reserve(
    account_id: str,
    amount: Amount,
    *,
    ttl_seconds: int = 0,
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.ReserveResponse, credits_pb2.Reservation]:
    req = credits_pb2.ReserveRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        ttl_seconds=ttl_seconds,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Reserve", req, lambda r: r.reservation, mutating=True)


def capture(
    reservation_id: str,
    amount: Amount | None = None,
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.CaptureResponse, credits_pb2.CaptureResponse]:
    """``amount=None`` captures the whole hold."""
    req = credits_pb2.CaptureRequest(
        request_id=_request_id(request_id),
        reservation_id=reservation_id,
        amount="" if amount is None else to_wire(amount),
        description=description,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Capture", req, lambda r: r, mutating=True)


def release(
    reservation_id: str, *, request_id: str | None = None
) -> Rpc[credits_pb2.ReleaseResponse, credits_pb2.Reservation]:
    req = credits_pb2.ReleaseRequest(
        request_id=_request_id(request_id), reservation_id=reservation_id
    )
    return Rpc("credits", "Release", req, lambda r: r.reservation, mutating=True)


def get_reservation(
    reservation_id: str,
) -> Rpc[credits_pb2.GetReservationResponse, credits_pb2.Reservation]:
    req = credits_pb2.GetReservationRequest(reservation_id=reservation_id)
    return Rpc("credits", "GetReservation", req, lambda r: r.reservation)


def debit(
    account_id: str,
    amount: Amount,
    *,
    description: str = "",
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.DebitResponse, ledger_pb2.LedgerEntry]:
    req = credits_pb2.DebitRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        description=description,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Debit", req, lambda r: r.entry, mutating=True)


def top_up(
    account_id: str,
    amount: Amount,
    *,
    description: str = "",
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.TopUpResponse, ledger_pb2.LedgerEntry]:
    req = credits_pb2.TopUpRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        description=description,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "TopUp", req, lambda r: r.entry, mutating=True)


def adjust(
    account_id: str,
    amount: Amount,
    reason: str,
    *,
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.AdjustResponse, ledger_pb2.LedgerEntry]:
    req = credits_pb2.AdjustRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        reason=reason,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Adjust", req, lambda r: r.entry, mutating=True)


# --- LedgerService ---------------------------------------------------------


def list_entries(
    account_id: str,
    *,
    type: EntryTypeArg = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> Rpc[ledger_pb2.ListEntriesResponse, ledger_pb2.ListEntriesResponse]:
    req = ledger_pb2.ListEntriesRequest(
        account_id=account_id,
        type=entry_type(type),
        start_time=None if start_time is None else to_timestamp(start_time),
        end_time=None if end_time is None else to_timestamp(end_time),
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("ledger", "ListEntries", req, lambda r: r)


def get_entry(entry_id: int) -> Rpc[ledger_pb2.GetEntryResponse, ledger_pb2.LedgerEntry]:
    req = ledger_pb2.GetEntryRequest(entry_id=entry_id)
    return Rpc("ledger", "GetEntry", req, lambda r: r.entry)


def verify_account(
    account_id: str,
) -> Rpc[ledger_pb2.VerifyAccountResponse, ledger_pb2.VerifyAccountResponse]:
    req = ledger_pb2.VerifyAccountRequest(account_id=account_id)
    return Rpc("ledger", "VerifyAccount", req, lambda r: r)
