# unasync: async-only
"""The client, written once: :class:`AsyncTallyClient` (``grpc.aio``).

:class:`~tally_client.TallyClient` (blocking) is generated from this file by
``scripts/unasync.py`` into ``_sync_client.py``: ``async``/``await`` dropped,
``grpc.aio`` becomes ``grpc``, ``AsyncIterator`` becomes ``Iterator``, and so on. Edit
this file, then run ``python scripts/unasync.py`` (``scripts/test`` checks that the
generated file is current). Lines between ``# unasync: async-only`` and
``# unasync: sync-only`` exist only here; the commented-out lines after
``# unasync: sync-only`` (up to ``# unasync: end``) only in the blocking client.
"""
# unasync: sync-only
# """The blocking client, :class:`TallyClient`, generated from ``_async_client.py``."""
# unasync: end

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
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
    metering_pb2,
    metering_pb2_grpc,
)

from . import _requests as rq
from ._base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_SECONDS,
    ChannelOptions,
    Metadata,
    channel_options,
    check_channel_args,
    part_path,
    replayable,
    report_format,
    settings,
    stream_timeout,
)
from ._retry import LOOP_RETRYABLE_CODES, RETRYABLE_CODES, backoff_delay, should_retry
from .amounts import Amount
from .errors import error_from_rpc

if TYPE_CHECKING:
    from tally.v1.accounts_pb2_grpc import AccountsServiceAsyncStub
    from tally.v1.credits_pb2_grpc import CreditsServiceAsyncStub
    from tally.v1.ledger_pb2_grpc import LedgerServiceAsyncStub
    from tally.v1.metering_pb2_grpc import MeteringServiceAsyncStub

__all__ = ["AsyncStubs", "AsyncTallyClient"]

T = TypeVar("T")

# unasync: async-only
#: What a failed call raises: grpc.aio also cancels the call when the request
#: iterator of a stream raises.
_CALL_ERRORS: tuple[type[BaseException], ...] = (grpc.RpcError, asyncio.CancelledError)
# unasync: sync-only
# #: What a failed call raises.
# _CALL_ERRORS: tuple[type[BaseException], ...] = (grpc.RpcError,)
# unasync: end


@dataclass(frozen=True, slots=True)
class AsyncStubs:
    """The generated stubs of a client (``client.stubs``)."""

    accounts: AccountsServiceAsyncStub
    credits: CreditsServiceAsyncStub
    ledger: LedgerServiceAsyncStub
    metering: MeteringServiceAsyncStub


class _AsyncStreamEvents:
    """The request iterator of one StreamUsage attempt.

    Remembers an exception raised by the caller's iterable (or by a non-event
    in it): gRPC only cancels the call then, and the client re-raises it.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def requests(
        self, events: AsyncIterable[Any] | Iterable[Any]
    ) -> AsyncIterator[metering_pb2.StreamUsageRequest]:
        batcher = rq.StreamBatcher()  # up to 100 events a message
        try:
            # unasync: async-only
            if not isinstance(events, AsyncIterable):
                for message in rq.stream_usage_requests(events):
                    yield message
                return
            # unasync: end
            async for event in events:
                packed = batcher.add(event)
                if packed is not None:
                    yield packed
            last = batcher.flush()
            if last is not None:
                yield last
        except Exception as e:
            self.error = e
            raise


class AsyncTallyClient:
    # unasync: async-only
    """``grpc.aio`` client of the Tally services; the methods of :class:`TallyClient`,
    as coroutines (``iter_*`` are async generators). Use ``async with`` or
    ``await client.close()``.

    A ``grpc.aio`` channel belongs to one event loop, so the client creates its
    channel lazily, on first use (in the running loop); it may therefore be
    constructed outside a loop, but must then be used within a single loop.
    """

    # unasync: sync-only
    # """Blocking client of the Tally services.
    #
    # ``TallyClient("127.0.0.1:50051")`` opens an insecure channel;
    # ``channel_credentials=grpc.ssl_channel_credentials()`` a secure one;
    # ``channel=...`` uses an existing channel (which :meth:`close` leaves open).
    # The client may be shared by threads.
    #
    # ``client.accounts`` / ``client.credits`` / ``client.ledger`` /
    # ``client.metering`` (also ``client.stubs.<name>``) are the raw generated stubs.
    # """
    # unasync: end

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
        stream_timeout_seconds: float | None = None,
    ) -> None:
        self.timeout_seconds, self.max_attempts, self.metadata = settings(
            timeout_seconds, max_attempts, metadata
        )
        self.stream_timeout_seconds = stream_timeout(self.timeout_seconds, stream_timeout_seconds)
        self.target = check_channel_args(target, channel, channel_credentials)
        self._credentials = channel_credentials
        self._options = channel_options(options, self.max_attempts)
        self._owns_channel = channel is None
        # What the client's own loops retry on calls with a gRPC retry policy: on a channel
        # it creates, gRPC retries UNAVAILABLE (the service config in ``_options``); a
        # channel passed in may have no retry policy, so the loops retry UNAVAILABLE too.
        self._loop_codes = LOOP_RETRYABLE_CODES if self._owns_channel else RETRYABLE_CODES
        self._channel: grpc.aio.Channel | None = channel
        self._stubs: AsyncStubs | None = None
        # unasync: sync-only
        # # At once, not on first use: threads sharing the client share one channel.
        # self._stubs = self.stubs
        # unasync: end

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel (``grpc.aio`` in the async client: created on first access)."""
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
        """The generated stubs (in the async client: created on first access)."""
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
                metering=cast(
                    "MeteringServiceAsyncStub", metering_pb2_grpc.MeteringServiceStub(channel)
                ),
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

    @property
    def metering(self) -> MeteringServiceAsyncStub:
        return self.stubs.metering

    #: Build a ``UsageEvent`` for :meth:`record_usage_batch` / :meth:`stream_usage`
    #: (the same as :func:`tally_client.usage_event`).
    usage_event = staticmethod(rq.usage_event)

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
        # gRPC retries UNAVAILABLE within each attempt's deadline (the service config); this
        # thin loop only gives DEADLINE_EXCEEDED another attempt with a deadline of its own,
        # which a service config cannot express.
        while True:
            attempt += 1
            try:
                response = await method(
                    rpc.request, timeout=self.timeout_seconds, metadata=self.metadata
                )
            except grpc.RpcError as e:
                if should_retry(e, attempt, self.max_attempts, self._loop_codes):
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
        display_name: str = "",
        time_zone: str = "",
        currency: str = "",
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        """Create an account; empty strings leave the server defaults."""
        return await self._call(
            rq.create_account(
                account_id,
                email=email,
                display_name=display_name,
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
        display_name: str | None = None,
        time_zone: str | None = None,
        overdraft_limit: Amount | None = None,
        trial_end_time: datetime | None = None,
        clear_trial_end_time: bool = False,
        request_id: str | None = None,
    ) -> account_pb2.Account:
        """Update the fields given (not None); the update mask names exactly those."""
        return await self._call(
            rq.update_account(
                account_id,
                email=email,
                display_name=display_name,
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
        """All accounts, ordered by id, fetching page after page."""
        token = ""
        while True:
            page = await self.list_accounts(page_size, token)
            for account in page.accounts:
                yield account
            token = page.next_page_token
            if not token:
                return

    # --- CreditsService --------------------------------------------------------

    async def get_balance(
        self, account_id: str, *, as_of: datetime | None = None
    ) -> credits_pb2.CreditBalance:
        """The balance now, or as of a past instant (`as_of`, timezone-aware)."""
        return await self._call(rq.get_balance(account_id, as_of))

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
        """Capture ``amount`` (None: the whole hold); returns reservation and entry."""
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
        grant_type: rq.GrantTypeArg = None,
        expire_time: datetime | None = None,
        priority: int | None = None,
        request_id: str | None = None,
    ) -> ledger_pb2.LedgerEntry:
        """Add credit as a grant.

        ``grant_type`` (default purchased), ``expire_time`` (default never) and
        ``priority`` (0-1000, lower is spent first; default by type) describe the grant.
        """
        return await self._call(
            rq.top_up(
                account_id,
                amount,
                description=description,
                reference=reference,
                metadata=metadata,
                grant_type=grant_type,
                expire_time=expire_time,
                priority=priority,
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
        """Write a signed correction (e.g. ``"-1.5"``) with a required reason."""
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

    async def list_grants(
        self, account_id: str, *, include_spent: bool = False
    ) -> list[credits_pb2.CreditGrant]:
        """All of the account's grants in draw order (page after page); ``include_spent``
        adds spent and expired ones."""
        return [g async for g in self.iter_grants(account_id, include_spent=include_spent)]

    async def iter_grants(
        self, account_id: str, *, include_spent: bool = False, page_size: int = 0
    ) -> AsyncIterator[credits_pb2.CreditGrant]:
        """The account's grants in draw order, fetching page after page."""
        token = ""
        while True:
            page = await self._call(
                rq.list_grants(
                    account_id,
                    include_spent=include_spent,
                    page_size=page_size,
                    page_token=token,
                )
            )
            for grant in page.grants:
                yield grant
            token = page.next_page_token
            if not token:
                return

    async def set_auto_reload(
        self,
        account_id: str,
        *,
        enabled: bool,
        threshold: Amount = "0",
        amount: Amount = "0",
        max_reloads_per_day: int = 0,
        max_amount_per_month: Amount = "0",
        request_id: str | None = None,
    ) -> credits_pb2.AutoReloadSettings:
        """Set the auto-reload rule (caps of 0 mean no limit); returns it as stored.

        Enabling it while available credit is below ``threshold`` starts a reload
        at once (asynchronously: watch :meth:`list_reloads`).
        """
        return await self._call(
            rq.set_auto_reload(
                account_id,
                enabled=enabled,
                threshold=threshold,
                amount=amount,
                max_reloads_per_day=max_reloads_per_day,
                max_amount_per_month=max_amount_per_month,
                request_id=request_id,
            )
        )

    async def list_reloads(
        self, account_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> credits_pb2.ListReloadsResponse:
        """One page of the account's reload intents, newest first."""
        return await self._call(
            rq.list_reloads(account_id, page_size=page_size, page_token=page_token)
        )

    async def iter_reloads(
        self, account_id: str, *, page_size: int = 0
    ) -> AsyncIterator[credits_pb2.ReloadIntent]:
        """All of the account's reload intents, newest first, fetching page after page."""
        token = ""
        while True:
            page = await self.list_reloads(account_id, page_size=page_size, page_token=token)
            for intent in page.reloads:
                yield intent
            token = page.next_page_token
            if not token:
                return

    async def get_grant(self, grant_id: str) -> credits_pb2.CreditGrant:
        """One credit grant (:class:`~tally_client.GrantNotFound` if there is none)."""
        return await self._call(rq.get_grant(grant_id))

    async def get_reload(self, intent_id: str) -> credits_pb2.ReloadIntent:
        """One reload intent (:class:`~tally_client.ReloadNotFound` if there is none)."""
        return await self._call(rq.get_reload(intent_id))

    async def list_reservations(
        self,
        account_id: str,
        *,
        status: rq.ReservationStatusArg = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> credits_pb2.ListReservationsResponse:
        """One page of the account's reservations, newest first (``status``: only those)."""
        return await self._call(
            rq.list_reservations(
                account_id, status=status, page_size=page_size, page_token=page_token
            )
        )

    async def iter_reservations(
        self, account_id: str, *, status: rq.ReservationStatusArg = None, page_size: int = 0
    ) -> AsyncIterator[credits_pb2.Reservation]:
        """All of the account's reservations, newest first, fetching page after page."""
        token = ""
        while True:
            page = await self.list_reservations(
                account_id, status=status, page_size=page_size, page_token=token
            )
            for reservation in page.reservations:
                yield reservation
            token = page.next_page_token
            if not token:
                return

    async def create_threshold(
        self,
        account_id: str,
        *,
        metric: rq.ThresholdMetricArg,
        value: Amount,
        percent: int = 0,
        period: rq.ThresholdPeriodArg = None,
        request_id: str | None = None,
    ) -> credits_pb2.Threshold:
        """Register a threshold: one notification per crossing (see
        :meth:`list_notifications`). ``value`` is credits (available credit, usage
        credits) or a whole number of requests; usage metrics need a ``period``
        (``"day"``/``"month"`` of the account's time zone) and may fire at ``percent``
        of ``value``."""
        return await self._call(
            rq.create_threshold(
                account_id,
                metric=metric,
                value=value,
                percent=percent,
                period=period,
                request_id=request_id,
            )
        )

    async def list_thresholds(
        self, account_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> credits_pb2.ListThresholdsResponse:
        """One page of the account's live thresholds, newest first."""
        return await self._call(
            rq.list_thresholds(account_id, page_size=page_size, page_token=page_token)
        )

    async def get_threshold(self, threshold_id: str) -> credits_pb2.Threshold:
        """One threshold, live or deleted (:class:`~tally_client.ThresholdNotFound`
        if there is none)."""
        return await self._call(rq.get_threshold(threshold_id))

    async def get_notification(self, notification_id: str) -> credits_pb2.Notification:
        """One notification with its delivery status
        (:class:`~tally_client.NotificationNotFound` if there is none)."""
        return await self._call(rq.get_notification(notification_id))

    async def delete_threshold(
        self, account_id: str, threshold_id: str, *, request_id: str | None = None
    ) -> credits_pb2.Threshold:
        """Delete a threshold (it fires no more); returns it as deleted."""
        return await self._call(
            rq.delete_threshold(account_id, threshold_id, request_id=request_id)
        )

    async def list_notifications(
        self, account_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> credits_pb2.ListNotificationsResponse:
        """One page of the account's threshold notifications, newest first, with
        their delivery status."""
        return await self._call(
            rq.list_notifications(account_id, page_size=page_size, page_token=page_token)
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
        """One page of an account's entries, newest first."""
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
        """All of an account's entries matching the filters, newest first."""
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

    # --- AccountsService: summary ------------------------------------------------

    async def get_account_summary(self, account_id: str) -> accounts_pb2.GetAccountSummaryResponse:
        """Balance, subscription, usage this month, lifetime requests, activity."""
        return await self._call(rq.get_account_summary(account_id))

    async def set_subscription(
        self,
        account_id: str,
        plan: str,
        credits_per_period: Amount,
        *,
        period: rq.SubscriptionPeriodArg = "monthly",
        anchor_time: datetime | None = None,
        rollover: bool = False,
        request_id: str | None = None,
    ) -> accounts_pb2.Subscription:
        """Set or change the account's subscription; returns it as stored.

        ``anchor_time`` (default now, at most a year ahead) starts the first
        period, whose grant is credited at once unless the anchor is in the future.
        ``rollover=True`` keeps a period's unspent credit (its grant never expires).
        """
        return await self._call(
            rq.set_subscription(
                account_id,
                plan,
                credits_per_period,
                period=period,
                anchor_time=anchor_time,
                rollover=rollover,
                request_id=request_id,
            )
        )

    async def cancel_subscription(
        self, account_id: str, *, request_id: str | None = None
    ) -> accounts_pb2.Subscription:
        """Cancel the subscription (SetSubscription with an empty plan)."""
        return await self._call(rq.cancel_subscription(account_id, request_id=request_id))

    # --- MeteringService: catalog ----------------------------------------------

    async def upsert_product(
        self,
        product_id: str,
        credits_per_unit: Amount,
        *,
        display_name: str = "",
        charge_failed: bool = False,
        minimum_charge: Amount | None = None,
        request_id: str | None = None,
    ) -> metering_pb2.Product:
        """Create or replace a product of the catalog."""
        return await self._call(
            rq.upsert_product(
                product_id,
                credits_per_unit,
                display_name=display_name,
                charge_failed=charge_failed,
                minimum_charge=minimum_charge,
                request_id=request_id,
            )
        )

    async def list_products(
        self, page_size: int = 0, page_token: str = ""
    ) -> metering_pb2.ListProductsResponse:
        return await self._call(rq.list_products(page_size, page_token))

    async def iter_products(self, page_size: int = 0) -> AsyncIterator[metering_pb2.Product]:
        """The whole catalog, ordered by product id, fetching page after page."""
        token = ""
        while True:
            page = await self.list_products(page_size, token)
            for product in page.products:
                yield product
            token = page.next_page_token
            if not token:
                return

    async def get_product(self, product_id: str) -> metering_pb2.Product:
        """One product of the catalog (:class:`~tally_client.ProductNotFound` if none)."""
        return await self._call(rq.get_product(product_id))

    async def get_usage_event(self, account_id: str, event_id: str) -> metering_pb2.UsageEvent:
        """One usage event (:class:`~tally_client.EventNotFound` if there is none)."""
        return await self._call(rq.get_usage_event(account_id, event_id))

    # --- MeteringService: recording --------------------------------------------

    async def record_usage(
        self,
        account_id: str,
        event_id: str,
        product_id: str,
        *,
        endpoint: str = "",
        status: rq.UsageStatusArg = None,
        success: bool | None = None,
        status_code: int = 0,
        message: str = "",
        quantity: int | None = None,
        credits: Amount | None = None,
        start_time: datetime | None = None,
        complete_time: datetime | None = None,
        processing_time_ms: int = 0,
        request_metadata: Mapping[str, Any] | None = None,
        result_metadata: Mapping[str, Any] | None = None,
        webhook_url: str = "",
    ) -> metering_pb2.RecordUsageResponse:
        """Record one finished (COMPLETED or FAILED) event and charge it.

        ``event_id`` is the idempotency key: a retry resends the same event, and
        a duplicate answers ``duplicate=True`` without charging again.
        """
        event = rq.usage_event(
            account_id,
            event_id,
            product_id,
            endpoint=endpoint,
            status=status,
            success=success,
            status_code=status_code,
            message=message,
            quantity=quantity,
            credits=credits,
            start_time=start_time,
            complete_time=complete_time,
            processing_time_ms=processing_time_ms,
            request_metadata=request_metadata,
            result_metadata=result_metadata,
            webhook_url=webhook_url,
        )
        return await self._call(rq.record_usage(event))

    async def record_usage_batch(
        self, events: Iterable[metering_pb2.UsageEvent]
    ) -> metering_pb2.RecordUsageBatchResponse:
        """Record up to 1,000 events (see :func:`usage_event`); one result per event.

        Per-event failures are in ``results[i].status``; use
        :func:`~tally_client.errors.error_from_status` to turn one into an exception.
        """
        return await self._call(rq.record_usage_batch(events))

    async def stream_usage(
        self,
        events: AsyncIterable[metering_pb2.UsageEvent] | Iterable[metering_pb2.UsageEvent],
        *,
        timeout_seconds: float | None = None,
    ) -> metering_pb2.StreamUsageResponse:
        """Send events on one client stream; the response counts them. Events go
        up to 100 to a message (``StreamUsageRequest.events``).

        Retried (replaying every event, which is safe by ``event_id``) only when
        ``events`` is a Sequence; any other iterable is consumed once (the async
        client also takes an async iterable).
        ``timeout_seconds`` overrides ``stream_timeout_seconds`` for this call.
        """
        timeout = self.stream_timeout_seconds if timeout_seconds is None else timeout_seconds
        attempts = self.max_attempts if replayable(events) else 1
        attempt = 0
        while True:
            attempt += 1
            requests = _AsyncStreamEvents()
            try:
                response = await self.stubs.metering.StreamUsage(
                    requests.requests(events), timeout=timeout, metadata=self.metadata
                )
                return cast("metering_pb2.StreamUsageResponse", response)
            except _CALL_ERRORS as e:
                if requests.error is not None:
                    raise requests.error from e
                if not isinstance(e, grpc.RpcError):
                    raise
                if should_retry(e, attempt, attempts):
                    await asyncio.sleep(backoff_delay(attempt))
                    continue
                raise error_from_rpc(e) from e

    async def start_usage(
        self,
        account_id: str,
        event_id: str,
        product_id: str,
        *,
        endpoint: str = "",
        status: rq.UsageStatusArg = None,
        quantity: int | None = None,
        credits: Amount | None = None,
        ttl_seconds: int = 0,
        start_time: datetime | None = None,
        request_metadata: Mapping[str, Any] | None = None,
        webhook_url: str = "",
    ) -> metering_pb2.StartUsageResponse:
        """Start a long job: hold its estimated credits, record a PENDING/PROCESSING event."""
        return await self._call(
            rq.start_usage(
                account_id,
                event_id,
                product_id,
                endpoint=endpoint,
                status=status,
                quantity=quantity,
                credits=credits,
                ttl_seconds=ttl_seconds,
                start_time=start_time,
                request_metadata=request_metadata,
                webhook_url=webhook_url,
            )
        )

    async def complete_usage(
        self,
        account_id: str,
        event_id: str,
        *,
        quantity: int | None = None,
        credits: Amount | None = None,
        success: bool | None = None,
        status_code: int = 0,
        message: str = "",
        result_metadata: Mapping[str, Any] | None = None,
        complete_time: datetime | None = None,
        processing_time_ms: int = 0,
    ) -> metering_pb2.CompleteUsageResponse:
        """Complete a started job: capture the actual credits, release the rest."""
        return await self._call(
            rq.complete_usage(
                account_id,
                event_id,
                quantity=quantity,
                credits=credits,
                success=success,
                status_code=status_code,
                message=message,
                result_metadata=result_metadata,
                complete_time=complete_time,
                processing_time_ms=processing_time_ms,
            )
        )

    async def fail_usage(
        self,
        account_id: str,
        event_id: str,
        *,
        status_code: int = 0,
        message: str = "",
        result_metadata: Mapping[str, Any] | None = None,
        complete_time: datetime | None = None,
    ) -> metering_pb2.FailUsageResponse:
        """Fail a started job: release the hold (or charge it if the product says so)."""
        return await self._call(
            rq.fail_usage(
                account_id,
                event_id,
                status_code=status_code,
                message=message,
                result_metadata=result_metadata,
                complete_time=complete_time,
            )
        )

    # --- MeteringService: questions --------------------------------------------

    async def get_usage(
        self,
        account_id: str,
        *,
        period: rq.UsagePeriodArg = None,
        preset: rq.RangePresetArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        product_id: str = "",
    ) -> metering_pb2.GetUsageResponse:
        """Usage totals and buckets; give ``preset`` or ``start_time``/``end_time``."""
        return await self._call(
            rq.get_usage(
                account_id,
                period=period,
                preset=preset,
                start_time=start_time,
                end_time=end_time,
                product_id=product_id,
            )
        )

    async def get_usage_summary(
        self, account_id: str, *, recent_events: int = 0
    ) -> metering_pb2.GetUsageSummaryResponse:
        return await self._call(rq.get_usage_summary(account_id, recent_events=recent_events))

    async def list_usage_events(
        self,
        account_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        product_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        preset: rq.RangePresetArg = None,
    ) -> metering_pb2.ListUsageEventsResponse:
        """One page of an account's usage events, newest first (``preset`` or
        ``start_time``/``end_time``)."""
        return await self._call(
            rq.list_usage_events(
                account_id,
                start_time=start_time,
                end_time=end_time,
                product_id=product_id,
                page_size=page_size,
                page_token=page_token,
                preset=preset,
            )
        )

    async def iter_usage_events(
        self,
        account_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        product_id: str = "",
        page_size: int = 0,
        preset: rq.RangePresetArg = None,
    ) -> AsyncIterator[metering_pb2.UsageEvent]:
        """All of an account's usage events matching the filters, newest first."""
        token = ""
        while True:
            page = await self.list_usage_events(
                account_id,
                start_time=start_time,
                end_time=end_time,
                product_id=product_id,
                page_size=page_size,
                page_token=token,
                preset=preset,
            )
            for event in page.events:
                yield event
            token = page.next_page_token
            if not token:
                return

    async def get_period_report(
        self,
        account_id: str,
        year: int,
        month: int,
        day: int = 0,
        *,
        period: rq.UsagePeriodArg = None,
        version: int = 0,
    ) -> metering_pb2.PeriodReport:
        """The usage report of a closed day or month of the account's time zone (the
        one holding the local date ``year``-``month``-``day``; ``day`` may be 0 for a
        month), at ``version`` (0: the latest). The first call freezes version 1; later
        writes into the period make new versions, each with its ``changes``.
        :class:`~tally_client.PeriodNotClosed` for a period that has not ended,
        :class:`~tally_client.ReportVersionNotFound` for a version past the latest."""
        return await self._call(
            rq.get_period_report(account_id, year, month, day, period=period, version=version)
        )

    def export_usage_report(
        self,
        account_id: str,
        *,
        format: rq.ReportFormatArg = "xlsx",
        preset: rq.RangePresetArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        product_id: str = "",
        timeout_seconds: float | None = None,
    ) -> AsyncIterator[bytes]:
        """The bytes of a CSV or XLSX usage report, chunk by chunk (``for chunk in ...``;
        in the async client ``async for``, not awaited).

        Arguments are checked now; the call starts when the first chunk is asked
        for. It is retried only until the first chunk arrives. Closing the
        iterator early cancels the call.
        """
        req = rq.export_usage_report(
            account_id,
            format=format,
            preset=preset,
            start_time=start_time,
            end_time=end_time,
            product_id=product_id,
        )
        timeout = self.stream_timeout_seconds if timeout_seconds is None else timeout_seconds
        return self._export_bytes(req, timeout)

    async def _export_bytes(
        self, req: metering_pb2.ExportUsageReportRequest, deadline: float
    ) -> AsyncIterator[bytes]:
        attempt = 0
        while True:
            attempt += 1
            received = False
            try:
                async for chunk in self._export_attempt(req, deadline):
                    received = True
                    yield chunk.data
                return
            except grpc.RpcError as e:
                # Before the first chunk gRPC retried UNAVAILABLE already; after it, the
                # caller has part of the report and the error is final.
                if not received and should_retry(e, attempt, self.max_attempts, self._loop_codes):
                    await asyncio.sleep(backoff_delay(attempt))
                    continue
                raise error_from_rpc(e) from e

    async def _export_attempt(
        self, req: metering_pb2.ExportUsageReportRequest, deadline: float
    ) -> AsyncIterator[metering_pb2.ExportUsageReportResponse]:
        call = self.stubs.metering.ExportUsageReport(req, timeout=deadline, metadata=self.metadata)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def export_usage_report_to(
        self,
        path: str | os.PathLike[str],
        account_id: str,
        *,
        format: rq.ReportFormatArg = None,
        preset: rq.RangePresetArg = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        product_id: str = "",
        timeout_seconds: float | None = None,
        progress: Callable[[int | None, int], None] | None = None,
    ) -> tuple[str, str, int]:
        """Write a usage report to ``path``; returns (file_name, content_type, bytes_written).

        ``format=None`` picks CSV for a ``.csv`` path, else XLSX. The report is
        written to ``<path>.part`` and renamed when complete, so ``path`` never
        holds a partial report; a retry starts the download over.

        ``progress(rows, bytes_written)`` is called after each chunk with the totals
        of the download so far (they start again from 0 when a retry starts over);
        ``rows`` counts the CSV lines after the header, and is None for XLSX.
        """
        target = Path(path)
        csv = report_format(format, target) == "csv"
        req = rq.export_usage_report(
            account_id,
            format=report_format(format, target),
            preset=preset,
            start_time=start_time,
            end_time=end_time,
            product_id=product_id,
        )
        timeout = self.stream_timeout_seconds if timeout_seconds is None else timeout_seconds
        part = part_path(target)
        attempt = 0
        try:
            while True:
                attempt += 1
                file_name = content_type = ""
                written = lines = 0
                received = False
                try:
                    with part.open("wb") as f:
                        async for chunk in self._export_attempt(req, timeout):
                            received = True
                            file_name = file_name or chunk.file_name
                            content_type = content_type or chunk.content_type
                            f.write(chunk.data)
                            written += len(chunk.data)
                            if progress is not None:
                                lines += chunk.data.count(b"\n")
                                progress(max(lines - 1, 0) if csv else None, written)
                except grpc.RpcError as e:
                    # gRPC retries a stream only until its first response; after that the
                    # download starts over here, for UNAVAILABLE too.
                    codes = RETRYABLE_CODES if received else self._loop_codes
                    if should_retry(e, attempt, self.max_attempts, codes):
                        await asyncio.sleep(backoff_delay(attempt))
                        continue
                    raise error_from_rpc(e) from e
                os.replace(part, target)
                return file_name, content_type, written
        finally:
            part.unlink(missing_ok=True)
