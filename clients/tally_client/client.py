"""Sync (:class:`TallyClient`) and async (:class:`AsyncTallyClient`) clients.

Both share the request builders of :mod:`tally_client._requests` and the retry
policy of :mod:`tally_client._retry`; only the call/retry loop differs.

Behaviour common to every high-level method:

* each attempt has a deadline of ``timeout_seconds``;
* UNAVAILABLE and DEADLINE_EXCEEDED are retried, up to ``max_attempts`` attempts
  in total, with exponential backoff and jitter (50 ms, 100 ms, ... capped at 2 s);
* a mutating call gets ``request_id=str(uuid.uuid4())`` unless one is given, and
  every retry resends the same request id (so the server applies it once);
* any :class:`grpc.RpcError` is raised as a :class:`~tally_client.errors.TallyError`
  subclass (``raise ... from rpc_error``);
* amounts go through :func:`~tally_client.amounts.to_wire`, metadata mappings
  become ``google.protobuf.Struct``, datetimes must be timezone-aware.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

import grpc

from tally.v1 import (
    account_pb2,
    accounts_pb2,
    accounts_pb2_grpc,
    credits_pb2,
    credits_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)

from . import _requests as rq
from ._retry import backoff_delay, should_retry
from .amounts import Amount
from .errors import error_from_rpc

if TYPE_CHECKING:
    from tally.v1.accounts_pb2_grpc import AccountsServiceAsyncStub
    from tally.v1.credits_pb2_grpc import CreditsServiceAsyncStub
    from tally.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_SECONDS",
    "AsyncStubs",
    "AsyncTallyClient",
    "Metadata",
    "Stubs",
    "TallyClient",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_ATTEMPTS = 4

#: Call metadata sent with every RPC, e.g. ``[("authorization", "Bearer ...")]``.
Metadata = Sequence[tuple[str, str | bytes]]
#: gRPC channel options, e.g. ``[("grpc.max_receive_message_length", 1 << 24)]``.
ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class Stubs:
    """The generated sync stubs of a :class:`TallyClient`."""

    accounts: accounts_pb2_grpc.AccountsServiceStub
    credits: credits_pb2_grpc.CreditsServiceStub
    ledger: ledger_pb2_grpc.LedgerServiceStub


@dataclass(frozen=True, slots=True)
class AsyncStubs:
    """The generated ``grpc.aio`` stubs of an :class:`AsyncTallyClient`."""

    accounts: AccountsServiceAsyncStub
    credits: CreditsServiceAsyncStub
    ledger: LedgerServiceAsyncStub


def _settings(
    timeout_seconds: float, max_attempts: int, metadata: Metadata | None
) -> tuple[float, int, tuple[tuple[str, str | bytes], ...] | None]:
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
    md = tuple((k, v) for k, v in metadata) if metadata else None
    return float(timeout_seconds), max_attempts, md


def _check_channel_args(target: str | None, channel: Any, credentials: Any) -> str | None:
    if channel is None:
        if not target:
            raise ValueError("give a target (host:port) or a channel")
        return target
    if target or credentials is not None:
        raise ValueError("give either a channel or a target (with credentials), not both")
    return None


class TallyClient:
    """Blocking client of the Tally services.

    ``TallyClient("127.0.0.1:50051")`` opens an insecure channel;
    ``channel_credentials=grpc.ssl_channel_credentials()`` a secure one;
    ``channel=...`` uses an existing channel (which :meth:`close` leaves open).

    ``client.accounts`` / ``client.credits`` / ``client.ledger`` (also
    ``client.stubs.<name>``) are the raw generated stubs.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        channel_credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | None = None,
        channel: grpc.Channel | None = None,
        options: ChannelOptions | None = None,
    ) -> None:
        self.timeout_seconds, self.max_attempts, self.metadata = _settings(
            timeout_seconds, max_attempts, metadata
        )
        target = _check_channel_args(target, channel, channel_credentials)
        self._owns_channel = channel is None
        if channel is None:
            opts = list(options or ())
            if channel_credentials is not None:
                channel = grpc.secure_channel(target, channel_credentials, options=opts)
            else:
                channel = grpc.insecure_channel(target, options=opts)
        self.target = target
        self.channel: grpc.Channel = channel
        self.stubs = Stubs(
            accounts=accounts_pb2_grpc.AccountsServiceStub(channel),
            credits=credits_pb2_grpc.CreditsServiceStub(channel),
            ledger=ledger_pb2_grpc.LedgerServiceStub(channel),
        )
        self.accounts = self.stubs.accounts
        self.credits = self.stubs.credits
        self.ledger = self.stubs.ledger

    # --- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- call loop -------------------------------------------------------------

    def _call(self, rpc: rq.Rpc[Any, T]) -> T:
        method = getattr(getattr(self.stubs, rpc.service), rpc.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = method(rpc.request, timeout=self.timeout_seconds, metadata=self.metadata)
            except grpc.RpcError as e:
                if should_retry(e, attempt, self.max_attempts):
                    time.sleep(backoff_delay(attempt))
                    continue
                raise error_from_rpc(e) from e
            return rpc.unwrap(response)

    # --- AccountsService -------------------------------------------------------

    def create_account(
        self,
        account_id: str,
        *,
        email: str = "",
        name: str = "",
        time_zone: str = "",
        currency: str = "",
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        """Create an account; empty strings leave the server defaults."""
        return self._call(
            rq.create_account(
                account_id,
                email=email,
                name=name,
                time_zone=time_zone,
                currency=currency,
                overdraft_limit=overdraft_limit,
                trial_end_time=trial_end_time,
                request_id=request_id,
            )
        )

    def get_account(self, account_id: str) -> account_pb2.Account:
        return self._call(rq.get_account(account_id))

    def update_account(
        self,
        account_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        time_zone: str | None = None,
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        clear_trial_end_time: bool = False,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        """Update the fields given (not None); the update mask names exactly those."""
        return self._call(
            rq.update_account(
                account_id,
                email=email,
                name=name,
                time_zone=time_zone,
                overdraft_limit=overdraft_limit,
                trial_end_time=trial_end_time,
                clear_trial_end_time=clear_trial_end_time,
                request_id=request_id,
            )
        )

    def list_accounts(
        self, page_size: int = 0, page_token: str = ""
    ) -> accounts_pb2.ListAccountsResponse:
        return self._call(rq.list_accounts(page_size, page_token))

    def iter_accounts(self, page_size: int = 0) -> Iterator[account_pb2.Account]:
        """All accounts, ordered by id, fetching page after page."""
        token = ""
        while True:
            page = self.list_accounts(page_size, token)
            yield from page.accounts
            token = page.next_page_token
            if not token:
                return

    # --- CreditsService --------------------------------------------------------

    def get_balance(self, account_id: str) -> credits_pb2.CreditBalance:
        return self._call(rq.get_balance(account_id))

    def reserve(
        self,
        account_id: str,
        amount: Amount,
        *,
        ttl_seconds: int = 0,
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> credits_pb2.Reservation:
        return self._call(
            rq.reserve(
                account_id,
                amount,
                ttl_seconds=ttl_seconds,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    def capture(
        self,
        reservation_id: str,
        amount: Amount | None = None,
        *,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> credits_pb2.CaptureResponse:
        """Capture ``amount`` (None: the whole hold); returns reservation and entry."""
        return self._call(
            rq.capture(
                reservation_id,
                amount,
                description=description,
                metadata=metadata,
                request_id=request_id,
            )
        )

    def release(
        self, reservation_id: str, *, request_id: str | None = None
    ) -> credits_pb2.Reservation:
        return self._call(rq.release(reservation_id, request_id=request_id))

    def get_reservation(self, reservation_id: str) -> credits_pb2.Reservation:
        return self._call(rq.get_reservation(reservation_id))

    def debit(
        self,
        account_id: str,
        amount: Amount,
        *,
        description: str = "",
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        return self._call(
            rq.debit(
                account_id,
                amount,
                description=description,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    def top_up(
        self,
        account_id: str,
        amount: Amount,
        *,
        description: str = "",
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        return self._call(
            rq.top_up(
                account_id,
                amount,
                description=description,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    def adjust(
        self,
        account_id: str,
        amount: Amount,
        reason: str,
        *,
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        """Write a signed correction (e.g. ``"-1.5"``) with a required reason."""
        return self._call(
            rq.adjust(
                account_id,
                amount,
                reason,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    # --- LedgerService ---------------------------------------------------------

    def list_entries(
        self,
        account_id: str,
        *,
        type: rq.EntryTypeArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> ledger_pb2.ListEntriesResponse:
        """One page of an account's entries, newest first."""
        return self._call(
            rq.list_entries(
                account_id,
                type=type,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=page_token,
            )
        )

    def iter_entries(
        self,
        account_id: str,
        *,
        type: rq.EntryTypeArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[ledger_pb2.LedgerEntry]:
        """All of an account's entries matching the filters, newest first."""
        token = ""
        while True:
            page = self.list_entries(
                account_id,
                type=type,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=token,
            )
            yield from page.entries
            token = page.next_page_token
            if not token:
                return

    def get_entry(self, entry_id: int) -> ledger_pb2.LedgerEntry:
        return self._call(rq.get_entry(entry_id))

    def verify_account(self, account_id: str) -> ledger_pb2.VerifyAccountResponse:
        return self._call(rq.verify_account(account_id))


class AsyncTallyClient:
    """``grpc.aio`` client of the Tally services; same methods as :class:`TallyClient`,
    as coroutines (``iter_*`` are async generators). Use ``async with`` or
    ``await client.close()``.

    A ``grpc.aio`` channel belongs to one event loop, so the client creates its
    channel lazily, on first use (in the running loop); it may therefore be
    constructed outside a loop, but must then be used within a single loop.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        channel_credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | None = None,
        channel: grpc.aio.Channel | None = None,
        options: ChannelOptions | None = None,
    ) -> None:
        self.timeout_seconds, self.max_attempts, self.metadata = _settings(
            timeout_seconds, max_attempts, metadata
        )
        self.target = _check_channel_args(target, channel, channel_credentials)
        self._credentials = channel_credentials
        self._options = list(options or ())
        self._owns_channel = channel is None
        self._channel: grpc.aio.Channel | None = channel
        self._stubs: AsyncStubs | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The ``grpc.aio`` channel (created on first access)."""
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        return self._channel

    @property
    def stubs(self) -> AsyncStubs:
        """The generated ``grpc.aio`` stubs (created on first access)."""
        if self._stubs is None:
            channel = self.channel
            # The generated stub classes serve both channel kinds; the *AsyncStub
            # types exist only in the .pyi files.
            self._stubs = AsyncStubs(
                accounts=cast(
                    "AccountsServiceAsyncStub", accounts_pb2_grpc.AccountsServiceStub(channel)
                ),
                credits=cast(
                    "CreditsServiceAsyncStub", credits_pb2_grpc.CreditsServiceStub(channel)
                ),
                ledger=cast("LedgerServiceAsyncStub", ledger_pb2_grpc.LedgerServiceStub(channel)),
            )
        return self._stubs

    @property
    def accounts(self) -> AccountsServiceAsyncStub:
        return self.stubs.accounts

    @property
    def credits(self) -> CreditsServiceAsyncStub:
        return self.stubs.credits

    @property
    def ledger(self) -> LedgerServiceAsyncStub:
        return self.stubs.ledger

    # --- lifecycle -----------------------------------------------------------

    async def close(self) -> None:
        """Close the channel (unless it was passed in or never created)."""
        if self._owns_channel and self._channel is not None:
            channel, self._channel, self._stubs = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- call loop -------------------------------------------------------------

    async def _call(self, rpc: rq.Rpc[Any, T]) -> T:
        method = getattr(getattr(self.stubs, rpc.service), rpc.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await method(
                    rpc.request, timeout=self.timeout_seconds, metadata=self.metadata
                )
            except grpc.RpcError as e:
                if should_retry(e, attempt, self.max_attempts):
                    await asyncio.sleep(backoff_delay(attempt))
                    continue
                raise error_from_rpc(e) from e
            return rpc.unwrap(response)

    # --- AccountsService -------------------------------------------------------

    async def create_account(
        self,
        account_id: str,
        *,
        email: str = "",
        name: str = "",
        time_zone: str = "",
        currency: str = "",
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        return await self._call(
            rq.create_account(
                account_id,
                email=email,
                name=name,
                time_zone=time_zone,
                currency=currency,
                overdraft_limit=overdraft_limit,
                trial_end_time=trial_end_time,
                request_id=request_id,
            )
        )

    async def get_account(self, account_id: str) -> account_pb2.Account:
        return await self._call(rq.get_account(account_id))

    async def update_account(
        self,
        account_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        time_zone: str | None = None,
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        clear_trial_end_time: bool = False,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        return await self._call(
            rq.update_account(
                account_id,
                email=email,
                name=name,
                time_zone=time_zone,
                overdraft_limit=overdraft_limit,
                trial_end_time=trial_end_time,
                clear_trial_end_time=clear_trial_end_time,
                request_id=request_id,
            )
        )

    async def list_accounts(
        self, page_size: int = 0, page_token: str = ""
    ) -> accounts_pb2.ListAccountsResponse:
        return await self._call(rq.list_accounts(page_size, page_token))

    async def iter_accounts(self, page_size: int = 0) -> AsyncIterator[account_pb2.Account]:
        token = ""
        while True:
            page = await self.list_accounts(page_size, token)
            for account in page.accounts:
                yield account
            token = page.next_page_token
            if not token:
                return

    # --- CreditsService --------------------------------------------------------

    async def get_balance(self, account_id: str) -> credits_pb2.CreditBalance:
        return await self._call(rq.get_balance(account_id))

    async def reserve(
        self,
        account_id: str,
        amount: Amount,
        *,
        ttl_seconds: int = 0,
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> credits_pb2.Reservation:
        return await self._call(
            rq.reserve(
                account_id,
                amount,
                ttl_seconds=ttl_seconds,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    async def capture(
        self,
        reservation_id: str,
        amount: Amount | None = None,
        *,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> credits_pb2.CaptureResponse:
        return await self._call(
            rq.capture(
                reservation_id,
                amount,
                description=description,
                metadata=metadata,
                request_id=request_id,
            )
        )

    async def release(
        self, reservation_id: str, *, request_id: str | None = None
    ) -> credits_pb2.Reservation:
        return await self._call(rq.release(reservation_id, request_id=request_id))

    async def get_reservation(self, reservation_id: str) -> credits_pb2.Reservation:
        return await self._call(rq.get_reservation(reservation_id))

    async def debit(
        self,
        account_id: str,
        amount: Amount,
        *,
        description: str = "",
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        return await self._call(
            rq.debit(
                account_id,
                amount,
                description=description,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    async def top_up(
        self,
        account_id: str,
        amount: Amount,
        *,
        description: str = "",
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        return await self._call(
            rq.top_up(
                account_id,
                amount,
                description=description,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    async def adjust(
        self,
        account_id: str,
        amount: Amount,
        reason: str,
        *,
        reference: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        return await self._call(
            rq.adjust(
                account_id,
                amount,
                reason,
                reference=reference,
                metadata=metadata,
                request_id=request_id,
            )
        )

    # --- LedgerService ---------------------------------------------------------

    async def list_entries(
        self,
        account_id: str,
        *,
        type: rq.EntryTypeArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> ledger_pb2.ListEntriesResponse:
        return await self._call(
            rq.list_entries(
                account_id,
                type=type,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=page_token,
            )
        )

    async def iter_entries(
        self,
        account_id: str,
        *,
        type: rq.EntryTypeArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[ledger_pb2.LedgerEntry]:
        token = ""
        while True:
            page = await self.list_entries(
                account_id,
                type=type,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=token,
            )
            for entry in page.entries:
                yield entry
            token = page.next_page_token
            if not token:
                return

    async def get_entry(self, entry_id: int) -> ledger_pb2.LedgerEntry:
        return await self._call(rq.get_entry(entry_id))

    async def verify_account(self, account_id: str) -> ledger_pb2.VerifyAccountResponse:
        return await self._call(rq.verify_account(account_id))
