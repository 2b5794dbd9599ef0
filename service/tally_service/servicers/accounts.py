"""tally.v1.AccountsService."""

from datetime import UTC, datetime, timedelta

import grpc

from tally.v1 import accounts_pb2, accounts_pb2_grpc, metering_pb2
from tally_service import (
    convert,
    fingerprint,
    models,
    pagination,
    ranges,
    reads,
    usage,
    validation,
)
from tally_service.db import Database
from tally_service.errors import InvalidArgument, quote
from tally_service.money import parse_amount

UPDATABLE = {"email", "display_name", "time_zone", "overdraft_limit", "trial_end_time"}
# Mask paths of earlier field names, still accepted: Account.name became display_name
# (same field number).
DEPRECATED_PATHS = {"name": "display_name"}
# The column each mask path updates, as the money function names it.
COLUMNS = {"display_name": "name"}


def _overdraft(value: str) -> int:
    return parse_amount("account.overdraft_limit", value or "0", allow_zero=True)


class AccountsServicer(accounts_pb2_grpc.AccountsServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.CreateAccountResponse:
        a = request.account
        response, _ = await self.db.call(
            "tally_create_account",
            {
                "request_id": validation.request_id(request.request_id),
                "fingerprint": fingerprint.of("CreateAccount", request),
                "account_id": validation.account_id(a.account_id, "account.account_id"),
                "email": validation.email(a.email),
                "name": validation.text(a.display_name, "account.display_name", 200),
                "time_zone": validation.time_zone(a.time_zone),
                "currency": validation.currency(a.currency),
                "overdraft_limit": _overdraft(a.overdraft_limit),
                "trial_ends_at": validation.optional_time(
                    a, "trial_end_time", a.trial_end_time, name="account.trial_end_time"
                ),
            },
        )
        row = convert.from_json(models.Account, response["account"])
        return accounts_pb2.CreateAccountResponse(account=convert.account(row))

    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.GetAccountResponse:
        row = await reads.get_account(self.db, validation.account_id(request.account_id))
        return accounts_pb2.GetAccountResponse(account=convert.account(row))

    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.UpdateAccountResponse:
        a = request.account
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask", "name at least one field to update")
        for path in paths:
            if DEPRECATED_PATHS.get(path, path) not in UPDATABLE:
                raise InvalidArgument(
                    "update_mask",
                    f"{quote(path)} cannot be updated; updatable: {sorted(UPDATABLE)}",
                )
        columns = [COLUMNS.get(p, p) for p in (DEPRECATED_PATHS.get(p, p) for p in paths)]
        response, _ = await self.db.call(
            "tally_update_account",
            {
                "request_id": validation.request_id(request.request_id),
                "fingerprint": fingerprint.of("UpdateAccount", request),
                "account_id": validation.account_id(a.account_id, "account.account_id"),
                "mask": columns,
                "email": validation.email(a.email),
                "name": validation.text(a.display_name, "account.display_name", 200),
                "time_zone": validation.time_zone(a.time_zone),
                "overdraft_limit": _overdraft(a.overdraft_limit),
                "trial_ends_at": validation.optional_time(
                    a, "trial_end_time", a.trial_end_time, name="account.trial_end_time"
                ),
            },
        )
        row = convert.from_json(models.Account, response["account"])
        return accounts_pb2.UpdateAccountResponse(account=convert.account(row))

    async def ListAccounts(
        self, request: accounts_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.ListAccountsResponse:
        limit = validation.page_size(request.page_size)
        key = pagination.decode(request.page_token, "accounts", pagination.short_text)
        after: str | None = key[0] if key else None
        rows, next_token = pagination.page(
            await reads.list_accounts(self.db, after, limit + 1),
            limit,
            "accounts",
            lambda a: a.account_id,
        )
        return accounts_pb2.ListAccountsResponse(
            accounts=[convert.account(r) for r in rows], next_page_token=next_token
        )

    async def GetAccountSummary(
        self, request: accounts_pb2.GetAccountSummaryRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.GetAccountSummaryResponse:
        balance = await reads.get_balance(self.db, validation.account_id(request.account_id))
        account = balance.account
        this_month = ranges.preset_range(
            metering_pb2.RANGE_PRESET_THIS_MONTH, ranges.account_zone(account), datetime.now(UTC)
        )
        usage_this_month = await usage.usage_response(
            self.db, account, metering_pb2.USAGE_PERIOD_MONTHLY, this_month, ""
        )
        return accounts_pb2.GetAccountSummaryResponse(
            account=convert.account(account),
            credit_balance=convert.credit_balance(balance),
            subscription=convert.subscription(
                await reads.get_subscription(self.db, account.account_id)
            ),
            usage_this_month=usage_this_month,
            total_requests_all_time=account.usage_requests,
            account_create_time=convert.timestamp(account.created_at),
            last_activity_time=convert.timestamp(
                max(t for t in (account.last_activity_at, balance.update_time) if t)
            ),
        )

    async def SetSubscription(
        self, request: accounts_pb2.SetSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.SetSubscriptionResponse:
        sub = request.subscription
        plan = validation.text(sub.plan, "subscription.plan", 64)
        credits, period, anchor = 0, "monthly", datetime.now(UTC)
        if plan:
            credits = parse_amount("subscription.credits_per_period", sub.credits_per_period)
            if sub.period not in convert.SUBSCRIPTION_PERIOD_NAMES:
                raise InvalidArgument("subscription.period", "MONTHLY or YEARLY is required")
            period = convert.SUBSCRIPTION_PERIOD_NAMES[sub.period]
            given = validation.optional_time(
                sub, "anchor_time", sub.anchor_time, name="subscription.anchor_time"
            )
            if given is not None:
                if given > anchor + timedelta(days=366):
                    raise InvalidArgument("subscription.anchor_time", "at most 1 year ahead")
                if given < anchor - timedelta(days=3660):
                    raise InvalidArgument("subscription.anchor_time", "at most 10 years back")
                anchor = given
        response, _ = await self.db.call(
            "tally_set_subscription",
            {
                "request_id": validation.request_id(request.request_id),
                "fingerprint": fingerprint.of("SetSubscription", request),
                "account_id": validation.account_id(request.account_id),
                "plan": plan,
                "credits": credits,
                "period": period,
                "anchor": anchor,
                "rollover": sub.rollover,
            },
        )
        row = response["subscription"]
        return accounts_pb2.SetSubscriptionResponse(
            subscription=convert.subscription(
                convert.from_json(models.Subscription, row) if row else None
            )
        )
