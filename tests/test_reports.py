"""ExportUsageReport: XLSX checked with openpyxl against GetUsage, CSV rows, flat memory."""

import asyncio
import csv
import io
import shutil
import subprocess
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import openpyxl
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import TallyClient
from tally_service import models, reads, reports
from tally_service.db import Database, async_url, make_engine
from tally_service.ranges import Range
from tests.conftest import ServerProcess, start_server
from tests.test_metering import event, product, record, ts

FIRST_CHUNK_SECONDS: list[float] = []


def export(
    stub: metering_pb2_grpc.MeteringServiceStub, request: m.ExportUsageReportRequest, path: Path
) -> tuple[str, str]:
    name = content_type = ""
    started = time.monotonic()
    with path.open("wb") as out:
        for chunk in stub.ExportUsageReport(request, timeout=600):
            if chunk.file_name:
                name, content_type = chunk.file_name, chunk.content_type
                FIRST_CHUNK_SECONDS.append(time.monotonic() - started)
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
    request = m.ExportUsageReportRequest(
        account_id=funded, time_range=m.UsageRange(start_time=ts(start), end_time=ts(end))
    )
    name, content_type = export(stub, request, tmp_path / "r.xlsx")
    assert name.startswith(f"usage-{funded}-") and name.endswith(".xlsx")
    assert "spreadsheetml" in content_type
    usage = stub.GetUsage(
        m.GetUsageRequest(
            account_id=funded,
            period=m.USAGE_PERIOD_DAILY,
            time_range=m.UsageRange(start_time=ts(start), end_time=ts(end)),
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
            format=m.REPORT_FORMAT_CSV,
            product_id=pan,
            time_range=m.UsageRange(start_time=ts(start), end_time=ts(end)),
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
                    account_id=funded,
                    time_range=m.UsageRange(preset=m.RANGE_PRESET_TODAY, start_time=ts(start)),
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
                account_id=account_id, time_range=m.UsageRange(preset=m.RANGE_PRESET_LAST_7_DAYS)
            )
            export(stub, request, tmp_path / "warm.xlsx")  # warm up imports and pools
            before = _peak_rss_kib(replica.process.pid)
            asyncio.run(_load_events(database_url, account_id, pan))
            FIRST_CHUNK_SECONDS.clear()
            export(stub, request, tmp_path / "big.xlsx")
            export(
                stub,
                m.ExportUsageReportRequest(
                    account_id=account_id,
                    format=m.REPORT_FORMAT_CSV,
                    time_range=m.UsageRange(preset=m.RANGE_PRESET_LAST_7_DAYS),
                ),
                tmp_path / "big.csv",
            )
            growth_mib = (_peak_rss_kib(replica.process.pid) - before) / 1024
        rows = sum(1 for _ in (tmp_path / "big.csv").open()) - 1
        assert rows == ROWS + 1
        book = openpyxl.load_workbook(tmp_path / "big.xlsx", read_only=True)
        # A streamed sheet has no <dimension> (its size is unknown when it starts): count.
        assert sum(1 for _ in book["Usage"].iter_rows(values_only=True)) == ROWS + 2
        print(f"export of {ROWS} rows: peak RSS grew by {growth_mib:.1f} MiB")
        # Both files start streaming at once, not when the rows are done.
        assert max(FIRST_CHUNK_SECONDS) < 1, FIRST_CHUNK_SECONDS
        # Holding 100,000 rows as Python objects would take well over 100 MiB.
        assert growth_mib < 40, f"peak RSS grew by {growth_mib:.1f} MiB"
    finally:
        replica.stop()


# -- streamed exports: sheets past the row limit, zip64, gzip, first bytes, odd text ------


async def _collect(
    database_url: str, account_id: str, r: Range, sheet_rows: int, **xlsx: Any
) -> tuple[bytes, bytes, str]:
    """An XLSX and a CSV built in this process by reports.Report on the test database."""
    db = Database(make_engine(database_url, pool_size=2))
    try:
        account = await reads.get_account(db, account_id)
        report = reports.Report(db, account, r, "", sheet_rows=sheet_rows)
        xlsx_bytes = b"".join([c async for c in report.xlsx_chunks(**xlsx)])
        csv_bytes = b"".join([c async for c in report.csv_chunks()])
        return xlsx_bytes, csv_bytes, report.file_name("xlsx")
    finally:
        await db.engine.dispose()


def _recorded(client: TallyClient, account_id: str, count: int, **fields: Any) -> datetime:
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    pan = product(stub, "1.5")
    base = datetime.now(UTC) - timedelta(hours=2)
    for i in range(count):
        record(
            stub,
            event(
                account_id,
                pan,
                event_id=f"ev-{i:03d}",
                start_time=ts(base + timedelta(minutes=i)),
                **fields,
            ),
        )
    return base


def test_rows_continue_on_the_next_sheet_with_the_header(
    client: TallyClient, funded: str, database_url: str
) -> None:
    base = _recorded(client, funded, 11)
    r = Range(base - timedelta(minutes=1), datetime.now(UTC))
    # 5 rows a sheet: the header and 4 events, so 11 events fill "Usage", "Usage (2)"
    # and 3 rows of "Usage (3)".
    data, csv_data, _ = asyncio.run(_collect(database_url, funded, r, 5))
    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    assert book.sheetnames == [
        "Usage",
        "Usage (2)",
        "Usage (3)",
        "By product and endpoint",
        "Daily",
    ]
    ids = []
    for name, count in (("Usage", 4), ("Usage (2)", 4), ("Usage (3)", 3)):
        rows = list(book[name].iter_rows(values_only=True))
        assert rows[0] == tuple(reports.HEADER), name
        assert len(rows) == 1 + count, name
        ids += [row[0] for row in rows[1:]]
        assert all(Decimal(str(row[8])) == Decimal("1.5") for row in rows[1:])
        assert all(isinstance(row[5], int) and isinstance(row[7], int) for row in rows[1:])
    assert ids == [f"ev-{i:03d}" for i in range(11)]
    totals = list(book["By product and endpoint"].iter_rows(values_only=True))
    assert totals[-1][:3] == ("Total", None, 11)
    assert Decimal(str(totals[-1][5])) == Decimal("16.5")
    lines = list(csv.reader(io.StringIO(csv_data.decode())))
    assert [line[0] for line in lines[1:]] == ids
    assert lines[1][1] == base.isoformat()  # as datetime.isoformat() writes it
    # The XLSX rows equal the CSV rows (the ISO timestamp text and every number).
    first = list(book["Usage"].iter_rows(values_only=True))[1]
    assert ["" if v is None else str(v) for v in first] == lines[1]


def test_zip64_records_read_back(client: TallyClient, funded: str, database_url: str) -> None:
    base = _recorded(client, funded, 3)
    r = Range(base - timedelta(minutes=1), datetime.now(UTC))
    # Every size and offset from 1 byte on goes to zip64 fields, as past 4 GiB.
    data, _, _ = asyncio.run(_collect(database_url, funded, r, reports.SHEET_ROWS, zip64_from=1))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert all(i.flag_bits & 0x08 for i in archive.infolist())
    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    assert len(list(book["Usage"].iter_rows(values_only=True))) == 4


def test_zip_stream_matches_zipfile_reading() -> None:
    archive = reports.ZipStream()
    payload = bytes(range(256)) * 4000
    data = (
        archive.whole("a.txt", b"hello")
        + archive.start("dir/b.bin")
        + archive.write(payload[:1000])
        + archive.write(payload[1000:])
        + archive.finish()
        + archive.whole("empty", b"")
        + archive.close()
    )
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        assert z.namelist() == ["a.txt", "dir/b.bin", "empty"]
        assert z.read("dir/b.bin") == payload and z.read("empty") == b""


def test_text_is_escaped_and_reads_back(
    client: TallyClient, funded: str, database_url: str
) -> None:
    message = "  a & b < c > \"d\" 'e' _x0041_ tab\there é ✓  "
    base = _recorded(client, funded, 1, message=message, endpoint="/x?a=1&b=<2>")
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    whole_second = (base + timedelta(minutes=1)).replace(microsecond=0)
    record(
        stub,
        event(
            funded,
            product(stub, "0"),
            event_id="ev-control",
            start_time=ts(whole_second),
            message="bell\x07 end",
        ),
    )
    r = Range(base - timedelta(minutes=1), datetime.now(UTC))
    data, csv_data, _ = asyncio.run(_collect(database_url, funded, r, reports.SHEET_ROWS))
    rows = list(
        openpyxl.load_workbook(io.BytesIO(data), read_only=True)["Usage"].iter_rows(
            values_only=True
        )
    )
    assert rows[1][3] == "/x?a=1&b=<2>"
    # openpyxl leaves OOXML's _xHHHH_ escapes as they are (Excel decodes them): the
    # literal "_x0041_" is kept by escaping its underscore, the bell is escaped.
    assert rows[1][6] in (message, message.replace("_x0041_", "_x005F_x0041_"))
    assert rows[2][6] in ("bell\x07 end", "bell_x0007_ end")
    lines = list(csv.reader(io.StringIO(csv_data.decode(), newline="")))
    assert lines[1][6] == message and lines[2][6] == "bell\x07 end"
    assert lines[2][1] == whole_second.isoformat()  # no fraction when it is zero
    assert lines[1][1] == base.isoformat() and base.microsecond


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata"])
def test_file_name_at_the_ends_of_time(zone: str) -> None:
    account = models.Account(account_id="acme", time_zone=zone)
    early = Range(datetime(1, 1, 1, tzinfo=UTC), datetime(1, 1, 2, tzinfo=UTC))
    late = Range(datetime(9999, 12, 31, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    name = reports.Report(None, account, early, "").file_name("csv")  # type: ignore[arg-type]
    assert name.startswith("usage-acme-0001") or name.startswith("usage-acme-1")
    name = reports.Report(None, account, late, "").file_name("xlsx")  # type: ignore[arg-type]
    assert name.endswith("-99991231.xlsx")


def test_export_at_the_ends_of_time(client: TallyClient, database_url: str) -> None:
    """Ranges in the years 1 and 9999, in zones on either side of UTC: a file or a
    canonical error naming a field, never INTERNAL or UNKNOWN."""
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    for zone in ("Pacific/Pago_Pago", "Pacific/Kiritimati"):
        account_id = f"edge-{uuid.uuid4().hex[:8]}"
        client.create_account(account_id, time_zone=zone)
        for start, end in (
            (datetime(1, 1, 1, tzinfo=UTC), datetime(1, 3, 1, tzinfo=UTC)),
            (datetime(9999, 11, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ):
            for fmt in (m.REPORT_FORMAT_CSV, m.REPORT_FORMAT_XLSX):
                request = m.ExportUsageReportRequest(
                    account_id=account_id,
                    format=fmt,
                    time_range=m.UsageRange(start_time=ts(start), end_time=ts(end)),
                )
                try:
                    chunks = list(stub.ExportUsageReport(request, timeout=30))
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
                    continue
                assert chunks[0].file_name.startswith(f"usage-{account_id}-")


def test_gzip_caller_gets_the_same_bytes(client: TallyClient, funded: str) -> None:
    base = _recorded(client, funded, 30, message="compressible " * 20)
    request = m.ExportUsageReportRequest(
        account_id=funded,
        format=m.REPORT_FORMAT_CSV,
        time_range=m.UsageRange(
            start_time=ts(base - timedelta(minutes=1)), end_time=ts(datetime.now(UTC))
        ),
    )

    ask = (("tally-response-compression", "gzip"),)

    async def fetch(
        compression: grpc.Compression | None,
        metadata: tuple[tuple[str, str], ...] = ask,
        options: tuple[tuple[str, int], ...] = (),
    ) -> bytes:
        async with grpc.aio.insecure_channel(client.target, options=options) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            call = stub.ExportUsageReport(
                request, timeout=30, compression=compression, metadata=metadata
            )
            return b"".join([c.data async for c in call])

    plain = asyncio.run(fetch(None, ()))
    assert plain.count(b"\n") == 31
    assert asyncio.run(fetch(grpc.Compression.Gzip)) == plain
    assert asyncio.run(fetch(None)) == plain
    assert asyncio.run(fetch(grpc.Compression.Gzip, ())) == plain
    # A client that cannot take gzip and does not ask for it gets identity.
    no_gzip = (("grpc.compression_enabled_algorithms_bitset", 1),)
    assert asyncio.run(fetch(None, (), no_gzip)) == plain
    xlsx_request = m.ExportUsageReportRequest()
    xlsx_request.CopyFrom(request)
    xlsx_request.format = m.REPORT_FORMAT_XLSX
    request = xlsx_request
    plain_book = openpyxl.load_workbook(io.BytesIO(asyncio.run(fetch(None))), read_only=True)
    gzip_book = openpyxl.load_workbook(
        io.BytesIO(asyncio.run(fetch(grpc.Compression.Gzip))), read_only=True
    )
    assert list(plain_book["Usage"].values) == list(gzip_book["Usage"].values)


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (soffice) is absent")
def test_libreoffice_converts_the_xlsx(
    client: TallyClient, funded: str, database_url: str, tmp_path: Path
) -> None:
    base = _recorded(client, funded, 7, message="a & b")
    r = Range(base - timedelta(minutes=1), datetime.now(UTC))
    data, _, _ = asyncio.run(_collect(database_url, funded, r, 5))
    (tmp_path / "r.xlsx").write_bytes(data)
    profile = tmp_path / "profile"
    subprocess.run(
        [
            "soffice",
            f"-env:UserInstallation=file://{profile}",
            "--headless",
            "--convert-to",
            "csv",
            "--outdir",
            str(tmp_path / "out"),
            str(tmp_path / "r.xlsx"),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    lines = list(csv.reader((tmp_path / "out" / "r.csv").open()))
    assert lines[0] == reports.HEADER
    assert len(lines) == 5 and lines[1][0] == "ev-000" and lines[1][6] == "a & b"
