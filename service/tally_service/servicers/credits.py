"""tally.v1.CreditsService."""

from typing import Any

import grpc

from tally.v1 import credits_pb2, credits_pb2_grpc
from tally_service import convert, fingerprint, models, store, validation
from tally_service.db import Database
from tally_service.money import parse_amount


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
        b = await store.get_balance(self.db, validation.account_id(request.account_id))
        return credits_pb2.GetBalanceResponse(balance=convert.credit_balance(b))

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
        hold = convert.from_json(models.Hold, response["reservation"])
        return credits_pb2.ReserveResponse(reservation=convert.reservation(hold))

    async def Capture(
        self, request: credits_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.CaptureResponse:
        response, _ = await self.db.call(
            "tally_capture",
            _common("Capture", request)
            | {
                "reservation_id": validation.reservation_id(request.reservation_id),
                "amount": parse_amount("amount", request.amount) if request.amount else None,
                "description": validation.text(
                    request.description, "description", validation.MAX_DESCRIPTION_CHARS
                ),
                "metadata": validation.metadata(request.metadata),
            },
        )
        return credits_pb2.CaptureResponse(
            reservation=convert.reservation(
                convert.from_json(models.Hold, response["reservation"])
            ),
            entry=convert.entry(convert.from_json(models.LedgerEntry, response["entry"])),
        )

    async def Release(
        self, request: credits_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.ReleaseResponse:
        response, _ = await self.db.call(
            "tally_release",
            _common("Release", request)
            | {"reservation_id": validation.reservation_id(request.reservation_id)},
        )
        hold = convert.from_json(models.Hold, response["reservation"])
        return credits_pb2.ReleaseResponse(reservation=convert.reservation(hold))

    async def GetReservation(
        self, request: credits_pb2.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> credits_pb2.GetReservationResponse:
        hold = await store.get_reservation(
            self.db, validation.reservation_id(request.reservation_id)
        )
        return credits_pb2.GetReservationResponse(reservation=convert.reservation(hold))

    async def _move(
        self, method: str, request: Any, entry_type: str, amount: int, description: str
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
            },
        )
        return convert.entry(convert.from_json(models.LedgerEntry, response["entry"]))

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
        entry = await self._move("TopUp", request, "credit", amount, description)
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
