"""tally.v1.LedgerService."""

import grpc

from tally.v1 import ledger_pb2, ledger_pb2_grpc
from tally_service import convert, pagination, reads, validation
from tally_service.db import Database
from tally_service.errors import InvalidArgument
from tally_service.money import format_amount


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ListEntries(
        self, request: ledger_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListEntriesResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        if request.type not in convert.ENTRY_TYPE_NAMES and request.type != 0:
            raise InvalidArgument("type", f"unknown entry type {request.type}")
        entry_type = convert.ENTRY_TYPE_NAMES.get(request.type)
        start = validation.optional_time(request, "start_time", request.start_time)
        end = validation.optional_time(request, "end_time", request.end_time)
        if start is not None and end is not None and start > end:
            raise InvalidArgument("start_time", "must not be after end_time")
        filters = [account_id, entry_type, start, end]
        key = pagination.decode(request.page_token, filters, pagination.integer)
        before: int | None = key[0] if key else None
        rows = await reads.list_entries(
            self.db,
            account_id,
            entry_type=entry_type,
            start=start,
            end=end,
            before_sequence=before,
            limit=limit + 1,
        )
        rows, next_token = pagination.page(rows, limit, filters, lambda e: e.sequence)
        return ledger_pb2.ListEntriesResponse(
            entries=[convert.entry(r) for r in rows], next_page_token=next_token
        )

    async def GetEntry(
        self, request: ledger_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetEntryResponse:
        if request.entry_id <= 0:
            raise InvalidArgument("entry_id", "must be a positive entry id")
        row = await reads.get_entry(self.db, request.entry_id)
        return ledger_pb2.GetEntryResponse(entry=convert.entry(row))

    async def VerifyAccount(
        self, request: ledger_pb2.VerifyAccountRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.VerifyAccountResponse:
        v = await reads.verify_account(self.db, validation.account_id(request.account_id))
        return ledger_pb2.VerifyAccountResponse(
            consistent=not v.violations,
            stored_balance=format_amount(v.stored_balance),
            ledger_balance=format_amount(v.ledger_balance),
            stored_reserved=format_amount(v.stored_reserved),
            holds_reserved=format_amount(v.holds_reserved),
            entry_count=v.entry_count,
            violations=v.violations,
        )
