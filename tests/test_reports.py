"""ExportUsageReport: XLSX checked with openpyxl against GetUsage, CSV rows, flat memory."""

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import openpyxl
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import TallyClient
from tally_service.db import async_url
from tests.conftest import ServerProcess, start_server
from tests.test_metering import event, product, record, ts


def export(
    stub: metering_pb2_grpc.MeteringServiceStub, request: m.ExportUsageReportRequest, path: Path
) -> tuple[str, str]:
    name = content_type = ""
    with path.open("wb") as out:
        for chunk in stub.ExportUsageReport(request, timeout=600):
            if chunk.file_name:
                name, content_type = chunk.file_name, chunk.content_type
            out.write(chunk.data)
    return name, content_type


def test_xlsx_matches_get_usage(client: TallyClient, funded: str, tmp_path: Path) -> None:
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    pan = product(stub, "2.95", charge_failed=True)
    ocr = product(stub, "0.333333")
    base = datetime.now(UTC) - timedelta(days=3)
    for i in range(12):
        record(
            stub,
            event(
                funded,
                pan if i % 2 else ocr,
                endpoint=f"/e{i % 3}",
                start_time=ts(base + timedelta(hours=5 * i)),
                status=m.USAGE_STATUS_FAILED if i == 5 else m.USAGE_STATUS_COMPLETED,
                status_code=500 if i == 5 else 200,
                message=f"row {i}",
            ),
        )
    start, end = base - timedelta(hours=1), datetime.now(UTC)
    request = m.ExportUsageReportRequest(account_id=funded, start_time=ts(start), end_time=ts(end))
    name, content_type = export(stub, request, tmp_path / "r.xlsx")
    assert name.startswith(f"usage-{funded}-") and name.endswith(".xlsx")
    assert "spreadsheetml" in content_type
    usage = stub.GetUsage(
        m.GetUsageRequest(
            account_id=funded, period=m.USAGE_PERIOD_DAILY, start_time=ts(start), end_time=ts(end)
        )
    )
    book = openpyxl.load_workbook(tmp_path / "r.xlsx", read_only=True)
    assert book.sheetnames == ["Usage", "By product and endpoint", "Daily"]
    rows = list(book["Usage"].iter_rows(values_only=True))
    assert rows[0][:3] == ("Transaction Id", "Timestamp(UTC)", "Product Id")
    assert len(rows) - 1 == usage.totals.total_requests == 12
    charges = sum(Decimal(str(r[8])) for r in rows[1:])
    assert charges == Decimal(usage.totals.credits_consumed)
    totals = list(book["By product and endpoint"].iter_rows(values_only=True))
    assert totals[-1][0] == "Total" and totals[-1][2] == 12
    assert Decimal(str(totals[-1][5])) == Decimal(usage.totals.credits_consumed)
    daily = list(book["Daily"].iter_rows(values_only=True))
    nonempty = [b for b in usage.buckets if b.total_requests]
    assert [r[1] for r in daily[1:-1]] == [b.total_requests for b in nonempty]

    csv_name, csv_type = export(
        stub,
        m.ExportUsageReportRequest(
            account_id=funded,
            start_time=ts(start),
            end_time=ts(end),
            format=m.REPORT_FORMAT_CSV,
            product_id=pan,
        ),
        tmp_path / "r.csv",
    )
    assert csv_name.endswith(".csv") and csv_type == "text/csv"
    lines = list(csv.reader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(lines) == 1 + 6
    assert {line[2] for line in lines[1:]} == {pan}
    assert lines[1][8] == "2.95"

    with pytest.raises(grpc.RpcError) as both:
        list(
            stub.ExportUsageReport(
                m.ExportUsageReportRequest(
                    account_id=funded, preset=m.RANGE_PRESET_TODAY, start_time=ts(start)
                ),
                timeout=10,
            )
        )
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        list(stub.ExportUsageReport(m.ExportUsageReportRequest(account_id="nobody"), timeout=10))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


ROWS = 100_000


async def _load_events(database_url: str, account_id: str, product_id: str) -> None:
    """Loads events straight into the table (the fast path of a load, not of the API)."""
    engine = create_async_engine(async_url(database_url))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO usage_events (account_id, event_id, product_id, endpoint, status, "
                "success, status_code, message, quantity, credits, started_at, completed_at, "
                "fingerprint) SELECT :a, 'bulk-' || i, :p, '/bulk', 'completed', true, 200, "
                "'Pan Verified Successfully.', 1, 0, now() - i * interval '1 second', now(), "
                "'\\x00' FROM generate_series(1, :n) AS i"
            ),
            {"a": account_id, "p": product_id, "n": ROWS},
        )
    await engine.dispose()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_100k_row_export_keeps_memory_flat(
    database_url: str, server_log_dir: Path, tmp_path: Path
) -> None:
    replica: ServerProcess = start_server(database_url, server_log_dir)
    try:
        with TallyClient(replica.target, timeout_seconds=30) as client:
            account_id = f"bulk-{uuid.uuid4().hex[:8]}"
            client.create_account(account_id)
            stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
            pan = product(stub, "0")
            record(stub, event(account_id, pan))
            request = m.ExportUsageReportRequest(
                account_id=account_id, preset=m.RANGE_PRESET_LAST_7_DAYS
            )
            export(stub, request, tmp_path / "warm.xlsx")  # warm up imports and pools
            before = _peak_rss_kib(replica.process.pid)
            asyncio.run(_load_events(database_url, account_id, pan))
            export(stub, request, tmp_path / "big.xlsx")
            export(
                stub,
                m.ExportUsageReportRequest(
                    account_id=account_id,
                    preset=m.RANGE_PRESET_LAST_7_DAYS,
                    format=m.REPORT_FORMAT_CSV,
                ),
                tmp_path / "big.csv",
            )
            growth_mib = (_peak_rss_kib(replica.process.pid) - before) / 1024
        rows = sum(1 for _ in (tmp_path / "big.csv").open()) - 1
        assert rows == ROWS + 1
        book = openpyxl.load_workbook(tmp_path / "big.xlsx", read_only=True)
        assert book["Usage"].max_row == ROWS + 2
        print(f"export of {ROWS} rows: peak RSS grew by {growth_mib:.1f} MiB")
        # Holding 100,000 rows as Python objects would take well over 100 MiB.
        assert growth_mib < 40, f"peak RSS grew by {growth_mib:.1f} MiB"
    finally:
        replica.stop()
