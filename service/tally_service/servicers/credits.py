"""tally.v1.CreditsService."""

import json
from datetime import UTC, datetime
from typing import Any

import grpc

from tally.v1 import credits_pb2, credits_pb2_grpc
from tally_service import convert, fingerprint, models, pagination, reads, validation
from tally_service.db import Database
from tally_service.errors import InvalidArgument
from tally_service.money import MAX_MOVEMENT_MICROS, parse_amount


def _common(method: str, request: Any) -> dict[str, Any]:
    return {
        "request_id": validation.request_id(request.request_id),
        "fingerprint": fingerprint.of(method, request),
    }


class CreditsServicer(credits_pb2_grpc.CreditsServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def GetBalance(
        self, request: credits_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetBalanceResponse:
        account_id = validation.account_id(request.account_id)
        as_of = validation.optional_time(request, "as_of", request.as_of)
        if as_of is None:
            b = await reads.get_balance(self.db, account_id)
            return credits_pb2.GetBalanceResponse(balance=convert.credit_balance(b))
        if as_of > datetime.now(UTC):
            raise InvalidArgument("as_of", "must not be in the future")
        past = await reads.get_balance_at(self.db, account_id, as_of, validation.MAX_TTL_SECONDS)
        return credits_pb2.GetBalanceResponse(balance=convert.credit_balance_at(past))

    async def Reserve(
        self, request: credits_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ReserveResponse:
        response, _ = await self.db.call(
            "tally_reserve",
            _common("Reserve", request)
            | {
                "account_id": validation.account_id(request.account_id),
                "amount": parse_amount("amount", request.amount),
                "ttl_seconds": validation.ttl_seconds(request.ttl_seconds),
                "reference": validation.text(
                    request.reference, "reference", validation.MAX_REFERENCE_CHARS
                ),
                "metadata": validation.metadata(request.metadata),
            },
        )
        return credits_pb2.ReserveResponse(
            reservation=convert.reservation_from_row(response["reservation"])
        )

    async def Capture(
        self, request: credits_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.CaptureResponse:
        common = _common("Capture", request)
        reservation_id = validation.reservation_id(request.reservation_id)
        response, _ = await self.db.call(
            "tally_capture",
            common
            | {
                "reservation_id": reservation_id,
                "amount": parse_amount("amount", request.amount) if request.amount else None,
                "description": validation.text(
                    request.description, "description", validation.MAX_DESCRIPTION_CHARS
                ),
                "metadata": validation.metadata(request.metadata),
            },
        )
        return credits_pb2.CaptureResponse(
            reservation=convert.reservation_from_row(response["reservation"]),
            entry=convert.entry_from_row(response["entry"]),
        )

    async def Release(
        self, request: credits_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ReleaseResponse:
        common = _common("Release", request)
        reservation_id = validation.reservation_id(request.reservation_id)
        response, _ = await self.db.call(
            "tally_release", common | {"reservation_id": reservation_id}
        )
        return credits_pb2.ReleaseResponse(
            reservation=convert.reservation_from_row(response["reservation"])
        )

    async def GetReservation(
        self, request: credits_pb2.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetReservationResponse:
        hold = await reads.get_reservation(
            self.db, validation.reservation_id(request.reservation_id)
        )
        return credits_pb2.GetReservationResponse(reservation=convert.reservation(hold))

    async def _move(
        self,
        method: str,
        request: Any,
        entry_type: str,
        amount: int,
        description: str,
        grant: dict[str, Any] | None = None,
    ) -> Any:
        response, _ = await self.db.call(
            "tally_move",
            _common(method, request)
            | {
                "method": method,
                "account_id": validation.account_id(request.account_id),
                "type": entry_type,
                "amount": amount,
                "description": description,
                "reference": validation.text(
                    request.reference, "reference", validation.MAX_REFERENCE_CHARS
                ),
                "metadata": validation.metadata(request.metadata),
                "grant": json.dumps(grant) if grant else None,
            },
        )
        return convert.entry_from_row(response["entry"])

    async def Debit(
        self, request: credits_pb2.DebitRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.DebitResponse:
        amount = parse_amount("amount", request.amount)
        description = validation.text(
            request.description, "description", validation.MAX_DESCRIPTION_CHARS
        )
        entry = await self._move("Debit", request, "debit", -amount, description)
        return credits_pb2.DebitResponse(entry=entry)

    async def TopUp(
        self, request: credits_pb2.TopUpRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.TopUpResponse:
        amount = parse_amount("amount", request.amount)
        description = validation.text(
            request.description, "description", validation.MAX_DESCRIPTION_CHARS
        )
        grant: dict[str, Any] = {"type": "purchased"}
        if request.grant_type:
            if request.grant_type not in convert.GRANT_TYPE_NAMES:
                raise InvalidArgument("grant_type", f"unknown grant type {request.grant_type}")
            grant["type"] = convert.GRANT_TYPE_NAMES[request.grant_type]
        expires = validation.optional_time(request, "expire_time", request.expire_time)
        if expires is not None:
            if expires <= datetime.now(UTC):
                raise InvalidArgument("expire_time", "must be in the future")
            grant["expires_at"] = expires.isoformat()
        if request.HasField("priority"):
            if not 0 <= request.priority <= 1000:
                raise InvalidArgument("priority", "must be 0 to 1000")
            grant["priority"] = request.priority
        entry = await self._move("TopUp", request, "credit", amount, description, grant)
        return credits_pb2.TopUpResponse(entry=entry)

    async def Adjust(
        self, request: credits_pb2.AdjustRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.AdjustResponse:
        amount = parse_amount("amount", request.amount, signed=True)
        reason = validation.text(
            request.reason, "reason", validation.MAX_DESCRIPTION_CHARS, required=True
        )
        entry = await self._move("Adjust", request, "adjustment", amount, reason)
        return credits_pb2.AdjustResponse(entry=entry)

    async def ListGrants(
        self, request: credits_pb2.ListGrantsRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ListGrantsResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        filters = ["grants", account_id, request.include_spent]
        after = pagination.decode(
            request.page_token,
            filters,
            pagination.small_integer,
            pagination.optional_instant,
            pagination.instant,
            pagination.uuid_text,
        )
        rows, token = pagination.page(
            await reads.list_grants(
                self.db,
                account_id,
                request.include_spent,
                (after[0], after[1], after[2], after[3]) if after else None,
                limit + 1,
            ),
            limit,
            filters,
            lambda g: [
                g.priority,
                g.expires_at.isoformat() if g.expires_at else None,
                g.created_at.isoformat(),
                str(g.grant_id),
            ],
        )
        return credits_pb2.ListGrantsResponse(
            grants=[convert.grant(r) for r in rows], next_page_token=token
        )

    async def SetAutoReload(
        self, request: credits_pb2.SetAutoReloadRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.SetAutoReloadResponse:
        settings = request.settings
        threshold = parse_amount("settings.threshold", settings.threshold or "0", allow_zero=True)
        amount = parse_amount(
            "settings.amount", settings.amount or "0", allow_zero=not settings.enabled
        )
        if settings.max_reloads_per_day < 0:
            raise InvalidArgument("settings.max_reloads_per_day", "must not be negative")
        max_per_month = parse_amount(
            "settings.max_amount_per_month",
            settings.max_amount_per_month or "0",
            allow_zero=True,
            limit_micros=MAX_MOVEMENT_MICROS * 1000,
        )
        response, _ = await self.db.call(
            "tally_set_auto_reload",
            _common("SetAutoReload", request)
            | {
                "account_id": validation.account_id(request.account_id),
                "enabled": settings.enabled,
                "threshold": threshold,
                "amount": amount,
                "max_per_day": settings.max_reloads_per_day,
                "max_per_month": max_per_month,
            },
        )
        account = convert.from_json(models.Account, response["account"])
        return credits_pb2.SetAutoReloadResponse(settings=convert.auto_reload(account))

    async def ListReloads(
        self, request: credits_pb2.ListReloadsRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ListReloadsResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        filters = ["reloads", account_id]
        before = pagination.decode_newest_first(request.page_token, filters)
        rows, token = pagination.newest_first_page(
            await reads.list_reloads(self.db, account_id, before, limit + 1),
            limit,
            filters,
            lambda r: (r.created_at, r.intent_id),
        )
        return credits_pb2.ListReloadsResponse(
            reloads=[convert.reload_intent(r) for r in rows], next_page_token=token
        )

    async def GetGrant(
        self, request: credits_pb2.GetGrantRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetGrantResponse:
        row = await reads.get_grant(self.db, validation.uuid_id(request.grant_id, "grant_id"))
        return credits_pb2.GetGrantResponse(grant=convert.grant(row))

    async def GetReload(
        self, request: credits_pb2.GetReloadRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetReloadResponse:
        row = await reads.get_reload(self.db, validation.uuid_id(request.intent_id, "intent_id"))
        return credits_pb2.GetReloadResponse(reload=convert.reload_intent(row))

    async def ListReservations(
        self, request: credits_pb2.ListReservationsRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ListReservationsResponse:
        account_id = validation.account_id(request.account_id)
        status: str | None = None
        if request.status:
            if request.status not in convert.RESERVATION_STATUS_NAMES:
                raise InvalidArgument("status", f"unknown status {request.status}")
            status = convert.RESERVATION_STATUS_NAMES[request.status]
        limit = validation.page_size(request.page_size)
        filters = ["reservations", account_id, status]
        before = pagination.decode_newest_first(request.page_token, filters)
        rows, token = pagination.newest_first_page(
            await reads.list_reservations(self.db, account_id, status, before, limit + 1),
            limit,
            filters,
            lambda r: (r.created_at, r.reservation_id),
        )
        return credits_pb2.ListReservationsResponse(
            reservations=[convert.reservation(r) for r in rows], next_page_token=token
        )

    async def CreateThreshold(
        self, request: credits_pb2.CreateThresholdRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.CreateThresholdResponse:
        spec = request.threshold
        metric = convert.THRESHOLD_METRIC_NAMES.get(spec.metric)
        if metric is None:
            raise InvalidArgument("threshold.metric", "required")
        percent = spec.percent or 100
        if not 1 <= percent <= 100:
            raise InvalidArgument("threshold.percent", "must be from 0 to 100")
        period = convert.THRESHOLD_PERIOD_NAMES.get(spec.period)
        if metric == "available_credit":
            if spec.period:
                raise InvalidArgument("threshold.period", "must be unset for available credit")
            if percent != 100:
                raise InvalidArgument("threshold.percent", "must be 0 or 100 for available credit")
            value = parse_amount("threshold.value", spec.value, signed=True, allow_zero=True)
        else:
            if period is None:
                raise InvalidArgument("threshold.period", "required for a usage metric")
            if metric == "usage_requests":
                if not (spec.value.isascii() and spec.value.isdigit()) or len(spec.value) > 15:
                    raise InvalidArgument("threshold.value", "must be a whole number of requests")
                value = int(spec.value)
                if value <= 0:
                    raise InvalidArgument("threshold.value", "must be positive")
            else:
                value = parse_amount(
                    "threshold.value", spec.value, limit_micros=MAX_MOVEMENT_MICROS * 1000
                )
        response, _ = await self.db.call(
            "tally_create_threshold",
            _common("CreateThreshold", request)
            | {
                "account_id": validation.account_id(request.account_id),
                "metric": metric,
                "value": value,
                "percent": percent,
                "period": period,
            },
        )
        row = convert.from_json(models.Threshold, response["threshold"])
        return credits_pb2.CreateThresholdResponse(threshold=convert.threshold(row))

    async def ListThresholds(
        self, request: credits_pb2.ListThresholdsRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ListThresholdsResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        filters = ["thresholds", account_id]
        before = pagination.decode_newest_first(request.page_token, filters)
        rows, token = pagination.newest_first_page(
            await reads.list_thresholds(self.db, account_id, before, limit + 1),
            limit,
            filters,
            lambda r: (r.created_at, r.threshold_id),
        )
        return credits_pb2.ListThresholdsResponse(
            thresholds=[convert.threshold(r) for r in rows], next_page_token=token
        )

    async def GetThreshold(
        self, request: credits_pb2.GetThresholdRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetThresholdResponse:
        row = await reads.get_threshold(
            self.db, validation.uuid_id(request.threshold_id, "threshold_id")
        )
        return credits_pb2.GetThresholdResponse(threshold=convert.threshold(row))

    async def GetNotification(
        self, request: credits_pb2.GetNotificationRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetNotificationResponse:
        row = await reads.get_notification(
            self.db, validation.uuid_id(request.notification_id, "notification_id")
        )
        return credits_pb2.GetNotificationResponse(notification=convert.notification(row))

    async def DeleteThreshold(
        self, request: credits_pb2.DeleteThresholdRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.DeleteThresholdResponse:
        threshold_id = validation.uuid_id(request.threshold_id, "threshold_id")
        response, _ = await self.db.call(
            "tally_delete_threshold",
            _common("DeleteThreshold", request)
            | {
                "account_id": validation.account_id(request.account_id),
                "threshold_id": threshold_id,
            },
        )
        row = convert.from_json(models.Threshold, response["threshold"])
        return credits_pb2.DeleteThresholdResponse(threshold=convert.threshold(row))

    async def ListNotifications(
        self, request: credits_pb2.ListNotificationsRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ListNotificationsResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        filters = ["notifications", account_id]
        before = pagination.decode_newest_first(request.page_token, filters)
        rows, token = pagination.newest_first_page(
            await reads.list_notifications(self.db, account_id, before, limit + 1),
            limit,
            filters,
            lambda r: (r.crossed_at, r.notification_id),
        )
        return credits_pb2.ListNotificationsResponse(
            notifications=[convert.notification(r) for r in rows], next_page_token=token
        )
