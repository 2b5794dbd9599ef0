"""Usage reports as CSV or XLSX, streamed in chunks with flat memory.

Rows come from a server-side cursor in partitions. CSV is formatted partition by
partition; XLSX goes through XlsxWriter in constant-memory mode (rows are flushed to a
temporary file as they are written) in a worker thread, and the finished file is then
read back in chunks. Charges are written from Decimal values, never floats.
"""

import asyncio
import csv
import io
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import xlsxwriter
from sqlalchemy import select

from tally_service import models, usage
from tally_service.db import Database
from tally_service.money import MICROS_PER_CREDIT
from tally_service.ranges import Range

CHUNK_BYTES = 64 * 1024
PARTITION_ROWS = 5000
XLSX_MAX_ROWS = 1_048_576 - 1  # one header row per sheet
HEADER = [
    "Transaction Id",
    "Timestamp(UTC)",
    "Product Id",
    "Endpoint",
    "Status",
    "Status Code",
    "Message",
    "Quantity",
    "Charge",
    "Processing Time (ms)",
]


def _credits(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_CREDIT


class Report:
    def __init__(self, db: Database, account: models.Account, r: Range, product_id: str) -> None:
        self.db = db
        self.account = account
        self.range = r
        self.product_id = product_id

    def file_name(self, extension: str) -> str:
        zone = ZoneInfo(self.account.time_zone)
        start = self.range.start.astimezone(zone).strftime("%Y%m%d")
        end = self.range.end.astimezone(zone).strftime("%Y%m%d")
        return f"usage-{self.account.account_id}-{start}-{end}.{extension}"

    async def _partitions(self) -> AsyncIterator[Sequence[Any]]:
        e = models.UsageEvent
        query = (
            select(
                e.event_id,
                e.started_at,
                e.product_id,
                e.endpoint,
                e.status,
                e.status_code,
                e.message,
                e.quantity,
                e.credits,
                e.processing_time_ms,
            )
            .where(
                e.account_id == self.account.account_id,
                e.started_at >= self.range.start,
                e.started_at < self.range.end,
                e.status.in_(("completed", "failed")),
            )
            .order_by(e.started_at, e.event_id)
        )
        if self.product_id:
            query = query.where(e.product_id == self.product_id)
        async with self.db.engine.connect() as conn:
            result = await conn.stream(query, execution_options={"yield_per": PARTITION_ROWS})
            async for partition in result.partitions(PARTITION_ROWS):
                yield partition

    @staticmethod
    def _row(row: Sequence[Any]) -> list[Any]:
        (event_id, started, product, endpoint, status, code, message, qty, credits, ms) = row
        return [
            event_id,
            started.isoformat(),
            product,
            endpoint,
            status,
            code,
            message,
            qty,
            _credits(credits),
            ms,
        ]

    async def csv_chunks(self) -> AsyncIterator[bytes]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(HEADER)
        async for partition in self._partitions():
            writer.writerows(self._row(row) for row in partition)
            if buffer.tell() >= CHUNK_BYTES:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue().encode()

    async def xlsx_chunks(self) -> AsyncIterator[bytes]:
        zone = ZoneInfo(self.account.time_zone)
        stats = await usage.stats(
            self.db, self.account.account_id, self.range, "day", zone, self.product_id
        )
        handle, path = tempfile.mkstemp(prefix="tally-report-", suffix=".xlsx")
        os.close(handle)
        try:
            workbook = xlsxwriter.Workbook(
                path, {"constant_memory": True, "tmpdir": tempfile.gettempdir()}
            )
            sheets = _RowSheets(workbook)
            async for partition in self._partitions():
                rows = [self._row(row) for row in partition]
                await asyncio.to_thread(sheets.write, rows)
            await asyncio.to_thread(_write_totals, workbook, stats)
            await asyncio.to_thread(workbook.close)
            with open(path, "rb") as f:  # noqa: ASYNC230 - small reads of a local file
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
        finally:
            os.unlink(path)


class _RowSheets:
    """The "Usage" sheet, continued on "Usage (2)"... past Excel's row limit."""

    def __init__(self, workbook: Any) -> None:
        self.workbook = workbook
        self.sheet: Any = None
        self.count = 0
        self.next_row = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self.count += 1
        name = "Usage" if self.count == 1 else f"Usage ({self.count})"
        self.sheet = self.workbook.add_worksheet(name)
        self.sheet.write_row(0, 0, HEADER)
        self.next_row = 1

    def write(self, rows: list[list[Any]]) -> None:
        for row in rows:
            if self.next_row > XLSX_MAX_ROWS:
                self._new_sheet()
            self.sheet.write_row(self.next_row, 0, row)
            self.next_row += 1


def _write_totals(workbook: Any, stats: usage.Stats) -> None:
    columns = ["Requests", "Successful", "Failed", "Credits", "Quantity"]

    def numbers(t: usage.Totals) -> list[Any]:
        return [t.requests, t.successful, t.failed, _credits(t.credits), t.quantity]

    by_product = workbook.add_worksheet("By product and endpoint")
    by_product.write_row(0, 0, ["Product Id", "Endpoint", *columns])
    row = 1
    for (product, endpoint), t in sorted(stats.by_product_endpoint.items()):
        by_product.write_row(row, 0, [product, endpoint, *numbers(t)])
        row += 1
    by_product.write_row(row, 0, ["Total", "", *numbers(stats.total)])

    daily = workbook.add_worksheet("Daily")
    daily.write_row(0, 0, ["Date", *columns])
    row = 1
    for day, t in sorted(stats.by_period.items()):
        daily.write_row(row, 0, [day.date().isoformat(), *numbers(t)])
        row += 1
    daily.write_row(row, 0, ["Total", *numbers(stats.total)])
