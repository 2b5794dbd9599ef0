"""tally.v1.MeteringService."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tally.v1 import metering_pb2, metering_pb2_grpc
from tally_service import (
    convert,
    errors,
    fingerprint,
    models,
    pagination,
    period_reports,
    ranges,
    reads,
    reports,
    usage,
    validation,
)
from tally_service.auth import current_caller
from tally_service.config import Settings
from tally_service.db import Database, UsageItem, insufficient_credits
from tally_service.money import parse_amount

MAX_BATCH = 1000
# Events of a stream recorded together (one call of tally_record_usage).
STREAM_GROUP = 1000
# Events per transaction when recording a batch or a stream group: a whole batch.
COMMIT_GROUP = 1000
MAX_STREAM_FAILURES = 1000
MAX_QUANTITY = 10**9
DEFAULT_JOB_TTL_SECONDS = 3600
FUTURE_SKEW = timedelta(minutes=5)
_NO_TIME = timedelta(0)
STATUS_NAMES = {
    metering_pb2.USAGE_STATUS_PENDING: "pending",
    metering_pb2.USAGE_STATUS_PROCESSING: "processing",
    metering_pb2.USAGE_STATUS_COMPLETED: "completed",
    metering_pb2.USAGE_STATUS_FAILED: "failed",
}


def _now() -> datetime:
    return datetime.now(UTC)


async def _abandon(recording: "asyncio.Future[Any]") -> None:
    """Cancels a statement whose answer the handler no longer waits for (its call ended
    or failed first) and waits until it has stopped; its outcome is nobody's answer."""
    recording.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await recording


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    # -- validation ---------------------------------------------------------------

    def _event_item(
        self,
        event: metering_pb2.UsageEvent,
        *,
        index: int,
        starting: bool,
        now: datetime | None = None,
    ) -> UsageItem:
        """Checks an event and returns it as the item the SQL functions take (`now`: the
        instant of the call, read once for a whole batch)."""
        now = now or _now()
        status = STATUS_NAMES.get(event.status)
        if starting:
            status = status or "pending"
            if status not in ("pending", "processing"):
                raise errors.InvalidArgument("event.status", "must be PENDING or PROCESSING")
        else:
            status = status or "completed"
            if status not in ("completed", "failed"):
                raise errors.InvalidArgument(
                    "event.status", "must be COMPLETED or FAILED; use StartUsage for long jobs"
                )
        success = event.success if event.HasField("success") else status == "completed"
        if status == "failed" and success:
            raise errors.InvalidArgument("event.success", "a FAILED event cannot be successful")
        quantity = event.quantity if event.HasField("quantity") else 1
        if not 0 <= quantity <= MAX_QUANTITY:
            raise errors.InvalidArgument("event.quantity", f"must be 0 to {MAX_QUANTITY}")
        # The times: `now` unless given (their fields are read only when set).
        started: datetime = now
        if event.HasField("start_time"):
            started = (
                validation.optional_time(
                    event, "start_time", event.start_time, name="event.start_time"
                )
                or now
            )
            if started < now - timedelta(days=self.settings.usage_backdate_days):
                raise errors.InvalidArgument(
                    "event.start_time",
                    f"more than {self.settings.usage_backdate_days} days in the past",
                )
            if started > now + FUTURE_SKEW:
                raise errors.InvalidArgument("event.start_time", "in the future")
        completed: datetime | None = None if starting else now
        if event.HasField("complete_time"):
            completed = validation.optional_time(
                event, "complete_time", event.complete_time, name="event.complete_time"
            )
        # (Both `now`, the usual event: in order, and 0 ms apart.)
        elapsed = None if completed is None or completed is started else completed - started
        if elapsed is not None and elapsed < _NO_TIME:
            raise errors.InvalidArgument("event.complete_time", "before start_time")
        if event.processing_time_ms < 0:
            raise errors.InvalidArgument("event.processing_time_ms", "must not be negative")
        processing_ms = event.processing_time_ms
        if not processing_ms and elapsed is not None:
            processing_ms = int(elapsed / timedelta(milliseconds=1))
        return UsageItem(
            index,
            validation.account_id(event.account_id, "event.account_id"),
            validation.event_id(event.event_id),
            validation.product_id(event.product_id, "event.product_id"),
            validation.text(event.endpoint, "event.endpoint", 256),
            status,
            success,
            event.status_code,
            validation.text(event.message, "event.message", 1024),
            quantity,
            (
                parse_amount("event.credits", event.credits, allow_zero=True)
                if event.credits
                else None
            ),
            started,
            completed,
            processing_ms,
            (
                validation.metadata(event.request_metadata, "event.request_metadata")
                if event.HasField("request_metadata")
                else "{}"
            ),
            (
                validation.metadata(event.result_metadata, "event.result_metadata")
                if event.HasField("result_metadata")
                else "{}"
            ),
            validation.text(event.webhook_url, "event.webhook_url", 2048),
            fingerprint.of("StartUsage" if starting else "RecordUsage", event),
        )

    # -- catalog ------------------------------------------------------------------

    async def UpsertProduct(
        self, request: metering_pb2.UpsertProductRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.UpsertProductResponse:
        p = request.product
        response, _ = await self.db.call(
            "tally_upsert_product",
            {
                "request_id": validation.request_id(request.request_id),
                "fingerprint": fingerprint.of("UpsertProduct", request),
                "product_id": validation.product_id(p.product_id, "product.product_id"),
                "display_name": validation.text(p.display_name, "product.display_name", 200),
                "credits_per_unit": parse_amount(
                    "product.credits_per_unit", p.credits_per_unit, allow_zero=True
                ),
                "charge_failed": p.charge_failed,
                "minimum_charge": parse_amount(
                    "product.minimum_charge", p.minimum_charge or "0", allow_zero=True
                ),
            },
        )
        row = convert.from_json(models.Product, response["product"])
        return metering_pb2.UpsertProductResponse(product=convert.product(row))

    async def ListProducts(
        self, request: metering_pb2.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListProductsResponse:
        limit = validation.page_size(request.page_size)
        key = pagination.decode(request.page_token, "products", pagination.short_text)
        rows, token = pagination.page(
            await reads.list_products(self.db, key[0] if key else None, limit + 1),
            limit,
            "products",
            lambda p: p.product_id,
        )
        return metering_pb2.ListProductsResponse(
            products=[convert.product(r) for r in rows], next_page_token=token
        )

    # -- recording ----------------------------------------------------------------

    async def _record(self, items: list[UsageItem]) -> list[Any]:
        """Records items in transactions of at most COMMIT_GROUP events (a whole batch:
        `tally_record_usage` applies them with set operations, well inside the statement
        timeout). A failure between groups is safe: a retry replays the committed events
        as duplicates. The caller acknowledges only after every group has committed."""
        results: list[Any] = []
        for first in range(0, len(items), COMMIT_GROUP):
            group = items[first : first + COMMIT_GROUP]
            try:
                answered = await self.db.record_usage(group)
            except errors.BalanceLimit:
                # A sum out of range (tally_record_usage refuses an out-of-range charge
                # itself, as BALANCE_LIMIT for that item) rolled the group back: record
                # its items one by one, so that only that item is refused and the others
                # keep their own outcome (DESIGN.md 9).
                if len(group) == 1:
                    raise
                answered = [await self._record_alone(item) for item in group]
            results.extend(answered)
        return results

    async def _record_alone(self, item: UsageItem) -> Any:
        try:
            (answered,) = await self.db.record_usage([item])
        except errors.BalanceLimit:
            return {"index": item.idx, "error": "BALANCE_LIMIT"}
        return answered

    @staticmethod
    def _item_error(result: dict[str, Any], item: UsageItem) -> errors.DomainError:
        reason = result["error"]
        if reason == "ACCOUNT_NOT_FOUND":
            return errors.NotFound("account", item.account_id)
        if reason == "PRODUCT_NOT_FOUND":
            return errors.NotFound("product", item.product_id)
        if reason == "BALANCE_LIMIT":
            return errors.BalanceLimit(
                "the event's charge would take the balance out of range",
                metadata={"account_id": item.account_id, "event_id": item.event_id},
            )
        if reason == "EVENT_ID_REUSED":
            return errors.EventIdReused(
                f"event_id {item.event_id!r} was already recorded with another payload",
                metadata={"account_id": item.account_id, "event_id": item.event_id},
            )
        return insufficient_credits({**result, "account_id": item.account_id})

    async def RecordUsage(
        self, request: metering_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RecordUsageResponse:
        item = self._event_item(request.event, index=0, starting=False)
        (result,) = await self._record([item])
        if "error" in result:
            raise self._item_error(result, item)
        if isinstance(result, list):
            return convert.usage_written(result, request.event, item, current_caller.get())
        return convert.usage_replayed(result)

    def _items(
        self, events: list[metering_pb2.UsageEvent], first_index: int
    ) -> tuple[list[UsageItem], dict[int, errors.DomainError]]:
        """The group's valid events as items, and the error of each invalid one."""
        items = []
        invalid: dict[int, errors.DomainError] = {}
        now = _now()
        for offset, event in enumerate(events):
            index = first_index + offset
            try:
                items.append(self._event_item(event, index=index, starting=False, now=now))
            except errors.DomainError as error:
                invalid[index] = error
        return items, invalid

    async def _record_batch(
        self,
        events: list[metering_pb2.UsageEvent],
        response: metering_pb2.RecordUsageBatchResponse,
    ) -> None:
        """Records a batch; one result per event, in order, each built in place in
        `response` (no result message is built apart and copied in)."""
        results = response.results
        for index, event in enumerate(events):
            results.add(index=index, event_id=event.event_id)
        items, invalid = self._items(events, 0)
        for index, error in invalid.items():
            results[index].status.CopyFrom(error.to_rpc_status())
        if not items:
            return
        by_index = {item.idx: item for item in items}
        written = convert.WrittenUsage(current_caller.get())
        # The statement leaves first; while PostgreSQL works, each valid event's response
        # is begun from the event itself (most events are written, each answered with
        # itself), so only what the database decides is left after its answer.
        recording = asyncio.ensure_future(self._record(items))
        try:
            await asyncio.sleep(0)
            for item in items:
                written.begin(results[item.idx].result, events[item.idx], item)
            answered = await recording
        except BaseException:
            # Cancelled (or failed) before the answer: the statement is cancelled too, as
            # when it was awaited in place.
            await _abandon(recording)
            raise
        for result in answered:
            if isinstance(result, list):
                index, of = result[convert.Written.INDEX], result[convert.Written.OF]
                message = results[index].result
                if of != index:  # a duplicate within the batch answers with its first
                    message.Clear()
                    written.begin(message, events[of], by_index[of])
                written.finish(message, result, by_index[of])
                continue
            index = int(result["index"])
            results[index].ClearField("result")
            if "error" in result:
                results[index].status.CopyFrom(
                    self._item_error(result, by_index[index]).to_rpc_status()
                )
            else:
                results[index].result.CopyFrom(convert.usage_replayed(result))

    async def _count_group(
        self, events: list[metering_pb2.UsageEvent], first_index: int
    ) -> tuple[int, int, list[metering_pb2.UsageResult]]:
        """Records a group of a stream: (recorded, duplicates, failures in index order).
        A stream answers only with counts, so no event's response is built."""
        items, invalid = self._items(events, first_index)
        failures = {
            index: metering_pb2.UsageResult(
                index=index,
                event_id=events[index - first_index].event_id,
                status=error.to_rpc_status(),
            )
            for index, error in invalid.items()
        }
        by_index = {item.idx: item for item in items}
        recorded = duplicates = 0
        for result in await self._record(items) if items else []:
            if isinstance(result, list):
                if result[convert.Written.DUPLICATE]:
                    duplicates += 1
                else:
                    recorded += 1
            elif "error" in result:
                item = by_index[int(result["index"])]
                failures[item.idx] = metering_pb2.UsageResult(
                    index=item.idx,
                    event_id=item.event_id,
                    status=self._item_error(result, item).to_rpc_status(),
                )
            else:
                duplicates += 1
        return recorded, duplicates, [failures[i] for i in sorted(failures)]

    async def RecordUsageBatch(
        self, request: metering_pb2.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RecordUsageBatchResponse:
        if not request.events:
            raise errors.InvalidArgument("events", "at least one event is required")
        if len(request.events) > MAX_BATCH:
            raise errors.InvalidArgument("events", f"at most {MAX_BATCH} events per batch")
        response = metering_pb2.RecordUsageBatchResponse()
        await self._record_batch(list(request.events), response)
        return response

    async def StreamUsage(
        self,
        request_iterator: AsyncIterator[metering_pb2.StreamUsageRequest],
        context: grpc.aio.ServicerContext,
    ) -> metering_pb2.StreamUsageResponse:
        """Events are recorded in groups of STREAM_GROUP while the stream goes on: the
        next group is read while the previous one is in the database (one at a time, so
        groups commit in order and memory stays bounded)."""
        response = metering_pb2.StreamUsageResponse()
        group: list[metering_pb2.UsageEvent] = []
        seen = 0
        recording: asyncio.Task[tuple[int, int, list[metering_pb2.UsageResult]]] | None = None

        async def settle() -> None:
            nonlocal recording
            if recording is None:
                return
            task, recording = recording, None
            recorded, duplicates, failures = await task
            response.recorded += recorded
            response.duplicates += duplicates
            response.failed += len(failures)
            room = MAX_STREAM_FAILURES - len(response.failures)
            response.failures.extend(failures[: max(room, 0)])

        async def flush() -> None:
            nonlocal seen, group, recording
            await settle()
            recording = asyncio.ensure_future(self._count_group(group, seen))
            seen += len(group)
            group = []

        try:
            async for message in request_iterator:
                if len(message.events) > MAX_BATCH:
                    raise errors.InvalidArgument(
                        "events", f"at most {MAX_BATCH} events per message"
                    )
                if message.HasField("event") or not message.events:
                    group.append(message.event)
                group.extend(message.events)
                if len(group) >= STREAM_GROUP:
                    await flush()
            if group:
                await flush()
            await settle()
        finally:
            if recording is not None and not recording.done():
                await _abandon(recording)
        return response

    # -- long jobs ----------------------------------------------------------------

    async def StartUsage(
        self, request: metering_pb2.StartUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.StartUsageResponse:
        item = self._event_item(request.event, index=0, starting=True)
        ttl = request.ttl_seconds or DEFAULT_JOB_TTL_SECONDS
        response, _ = await self.db.call(
            "tally_start_usage",
            {"item": _item_json(item), "ttl_seconds": validation.ttl_seconds(ttl)},
        )
        message = metering_pb2.StartUsageResponse(
            event=convert.usage_event(convert.from_json(models.UsageEvent, response["event"]))
        )
        if response.get("reservation"):
            message.reservation.CopyFrom(convert.reservation_from_row(response["reservation"]))
        return message

    async def _finish(self, request: Any, method: str, outcome: str) -> dict[str, Any]:
        completed = validation.optional_time(request, "complete_time", request.complete_time)
        item: dict[str, Any] = {
            "account_id": validation.account_id(request.account_id),
            "event_id": validation.event_id(request.event_id),
            "status": outcome,
            "status_code": request.status_code,
            "message": validation.text(request.message, "message", 1024),
            "result_metadata": json.loads(validation.metadata(request.result_metadata)),
            "completed_at": completed.isoformat() if completed else None,
            "fingerprint": fingerprint.of(method, request).hex(),
            "quantity": None,
            "credits": None,
            "processing_time_ms": None,
            "success": False,
        }
        if outcome == "completed":
            if request.HasField("quantity"):
                if not 0 <= request.quantity <= MAX_QUANTITY:
                    raise errors.InvalidArgument("quantity", f"must be 0 to {MAX_QUANTITY}")
                item["quantity"] = request.quantity
            if request.credits:
                item["credits"] = parse_amount("credits", request.credits, allow_zero=True)
            if request.processing_time_ms < 0:
                raise errors.InvalidArgument("processing_time_ms", "must not be negative")
            item["processing_time_ms"] = request.processing_time_ms or None
            item["success"] = request.success if request.HasField("success") else True
        response, _ = await self.db.call("tally_finish_usage", {"item": json.dumps(item)})
        return dict(response)

    async def CompleteUsage(
        self, request: metering_pb2.CompleteUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.CompleteUsageResponse:
        result = convert.usage_replayed(await self._finish(request, "CompleteUsage", "completed"))
        return metering_pb2.CompleteUsageResponse(
            event=result.event, entry=result.entry if result.HasField("entry") else None
        )

    async def FailUsage(
        self, request: metering_pb2.FailUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.FailUsageResponse:
        result = convert.usage_replayed(await self._finish(request, "FailUsage", "failed"))
        return metering_pb2.FailUsageResponse(
            event=result.event, entry=result.entry if result.HasField("entry") else None
        )

    # -- questions ----------------------------------------------------------------

    async def GetUsage(
        self, request: metering_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetUsageResponse:
        account = await reads.get_account(self.db, validation.account_id(request.account_id))
        r = self._range(request, account)
        product_id = (
            validation.product_id(request.product_id, "product_id") if request.product_id else ""
        )
        return await usage.usage_response(self.db, account, request.period, r, product_id)

    @staticmethod
    def _range(request: Any, account: models.Account) -> ranges.Range:
        return ranges.resolve(request.time_range, ranges.account_zone(account), _now())

    async def GetUsageSummary(
        self, request: metering_pb2.GetUsageSummaryRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetUsageSummaryResponse:
        account_id = validation.account_id(request.account_id)
        if request.recent_events < 0:
            raise errors.InvalidArgument("recent_events", "must not be negative")
        recent = min(request.recent_events or 10, 100)
        balance = await reads.get_balance(self.db, account_id)
        account = balance.account
        zone = ranges.account_zone(account)
        now = _now()
        months = []
        for preset in (metering_pb2.RANGE_PRESET_THIS_MONTH, metering_pb2.RANGE_PRESET_LAST_MONTH):
            r = ranges.preset_range(preset, zone, now)
            s = await reads.usage_stats(self.db, account_id, r, "month", zone, "")
            months.append(convert.usage_totals(s.total, r.start, r.end))
        events = await reads.list_usage_events(self.db, account_id, None, None, "", None, recent)
        return metering_pb2.GetUsageSummaryResponse(
            account=convert.account(account),
            balance=convert.credit_balance(balance),
            current_month=months[0],
            previous_month=months[1],
            recent_events=[convert.usage_event(e, expires_at) for e, expires_at in events],
        )

    async def ListUsageEvents(
        self, request: metering_pb2.ListUsageEventsRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListUsageEventsResponse:
        account_id = validation.account_id(request.account_id)
        limit = validation.page_size(request.page_size)
        given = ranges.given(request.time_range)
        product_id = (
            validation.product_id(request.product_id, "product_id") if request.product_id else ""
        )
        # The token is bound to the filters as given; it carries the range it resolved
        # to, so later pages keep the first page's "now".
        filters = [account_id, *given.key(), product_id]
        key = pagination.decode(
            request.page_token,
            filters,
            pagination.instant,
            pagination.short_text,
            pagination.instant,
            pagination.instant,
        )
        cursor: tuple[datetime, str] | None = None
        if key is not None:
            cursor = (key[0], key[1])
            start, end = key[2], key[3]
        account = await reads.get_account(self.db, account_id)
        # Days are the account's calendar days (a range across a DST change may be
        # 7 x 24 hours plus or minus one).
        zone = ranges.account_zone(account)
        days = self.settings.usage_list_max_days
        if key is None:
            # Not before the earliest instant the API accepts, so the token issued
            # for the next page carries a range it accepts back.
            r = ranges.resolve_given(
                given,
                zone,
                _now(),
                lambda end: max(ranges.add_days(end, -days, zone), validation.MIN_TIME),
            )
            start, end = r.start, r.end
        if start > end:
            raise errors.InvalidArgument("time_range.start_time", "must not be after end_time")
        if not ranges.within_days(ranges.Range(start, end), days, zone):
            raise errors.InvalidArgument(
                "time_range.end_time",
                f"the range may span at most {days} days of the account's time zone "
                f"({account.time_zone})",
            )
        rows = await reads.list_usage_events(
            self.db, account_id, start, end, product_id, cursor, limit + 1
        )
        rows, token = pagination.page(
            rows,
            limit,
            filters,
            lambda row: [
                row[0].started_at.isoformat(),
                row[0].event_id,
                start.isoformat(),
                end.isoformat(),
            ],
        )
        return metering_pb2.ListUsageEventsResponse(
            events=[convert.usage_event(e, expires_at) for e, expires_at in rows],
            next_page_token=token,
        )

    async def ExportUsageReport(
        self, request: metering_pb2.ExportUsageReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[metering_pb2.ExportUsageReportResponse]:
        account = await reads.get_account(self.db, validation.account_id(request.account_id))
        r = self._range(request, account)
        days = self.settings.usage_export_max_days
        if not ranges.within_days(r, days, ranges.account_zone(account)):
            raise errors.InvalidArgument(
                "time_range.end_time",
                f"the range may span at most {days} days of the account's time zone "
                f"({account.time_zone})",
            )
        product_id = (
            validation.product_id(request.product_id, "product_id") if request.product_id else ""
        )
        if request.format not in (
            metering_pb2.REPORT_FORMAT_UNSPECIFIED,
            metering_pb2.REPORT_FORMAT_CSV,
            metering_pb2.REPORT_FORMAT_XLSX,
        ):
            raise errors.InvalidArgument("format", f"unknown format {request.format}")
        as_csv = request.format == metering_pb2.REPORT_FORMAT_CSV
        report = reports.Report(self.db, account, r, product_id)
        if _asks_for_gzip(context):
            context.set_compression(grpc.Compression.Gzip)
        first = True
        chunks = report.csv_chunks() if as_csv else report.xlsx_chunks()
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                message = metering_pb2.ExportUsageReportResponse(data=chunk)
                if first:
                    message.file_name = report.file_name("csv" if as_csv else "xlsx")
                    message.content_type = "text/csv" if as_csv else reports.XLSX_TYPE
                    first = False
                yield message

    # -- single reads ---------------------------------------------------------------

    async def GetProduct(
        self, request: metering_pb2.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetProductResponse:
        row = await reads.get_product(self.db, validation.product_id(request.product_id))
        return metering_pb2.GetProductResponse(product=convert.product(row))

    async def GetUsageEvent(
        self, request: metering_pb2.GetUsageEventRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetUsageEventResponse:
        row, expires_at = await reads.get_usage_event(
            self.db,
            validation.account_id(request.account_id),
            validation.event_id(request.event_id, "event_id"),
        )
        return metering_pb2.GetUsageEventResponse(event=convert.usage_event(row, expires_at))

    async def GetPeriodReport(
        self, request: metering_pb2.GetPeriodReportRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetPeriodReportResponse:
        account_id = validation.account_id(request.account_id)
        if request.version < 0:
            raise errors.InvalidArgument("version", "must not be negative")
        account = await reads.get_account(self.db, account_id)
        p = period_reports.period_of(
            request.period, request.year, request.month, request.day, ranges.account_zone(account)
        )
        report = await period_reports.get(self.db, account, p, request.version, _now())
        return metering_pb2.GetPeriodReportResponse(report=convert.period_report(report))


def _item_json(item: UsageItem) -> str:
    """The item as the JSON document `tally_start_usage` takes."""
    return json.dumps(
        {
            **item._asdict(),
            "started_at": item.started_at.isoformat(),
            "completed_at": item.completed_at.isoformat() if item.completed_at else None,
            "request_metadata": json.loads(item.request_metadata),
            "result_metadata": json.loads(item.result_metadata),
            "fingerprint": item.fingerprint.hex(),
        }
    )


# How a caller asks for a gzip-compressed reply stream. A grpc.aio server is not told
# how the request was compressed (grpc-encoding and grpc-accept-encoding stay in the
# core), and gzip cannot be sent unasked: the core does not check the caller's
# grpc-accept-encoding, and a client without gzip (a Go client that did not register
# it, or one that disabled it) would fail the call.
RESPONSE_COMPRESSION_KEY = "tally-response-compression"


def _asks_for_gzip(context: grpc.aio.ServicerContext) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == RESPONSE_COMPRESSION_KEY and value == "gzip":
            return True
    return False
