"""Usage reports as CSV or XLSX, streamed from the first row with flat memory.

Rows come from `reads.usage_event_rows`: a server-side cursor (a read-only REPEATABLE
READ transaction on one pooled connection), FETCH_ROWS at a time, in the order of the index on
(account_id, started_at, event_id), so the first rows arrive without sorting the range.
The next batch is requested before the current one is formatted, so PostgreSQL and this
process work at the same time; gRPC's flow control holds the cursor back while the client
is slower than the server.

CSV lines are formatted as the csv module writes them. XLSX is a zip written as a stream
(`ZipStream`: local headers with data descriptors, deflate, zip64 records when an entry or
the archive passes 4 GiB), and each worksheet is written row by row as XML with inline
strings, so nothing but the current batches is held in memory and nothing is written to
disk. The first bytes (the CSV header; the XLSX's fixed parts and the first sheet's
header) are sent before the query runs. The totals sheets come after the rows: the
statistics are read when the rows are done, so the first byte never waits for them.

Charges are written as the exact decimal text of their micro-credits (`format_amount`),
never through a float; timestamps as ISO 8601 text in UTC, as before.
"""

import csv
import io
import re
import struct
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from tally_service import models, ranges, reads
from tally_service.db import Database
from tally_service.money import format_amount
from tally_service.ranges import Range

CHUNK_BYTES = 64 * 1024
# Excel's limit, the header row included; rows past it continue on "Usage (2)", ...
SHEET_ROWS = 1_048_576
DEFLATE_LEVEL = 1
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
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

MEMO_ENTRIES = 10_000


class _Memo(dict[Any, str]):
    """A function's results by argument, for the values that repeat from row to row
    (endpoints, messages, amounts); emptied when it reaches MEMO_ENTRIES."""

    def __init__(self, function: Callable[[Any], str]) -> None:
        super().__init__()
        self.function = function

    def __missing__(self, key: Any) -> str:
        if len(self) >= MEMO_ENTRIES:
            self.clear()
        value = self[key] = self.function(key)
        return value


def _csv_field(text: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([text])
    return out.getvalue() if text else ""


def _day(instant: datetime, zone: ZoneInfo) -> str:
    """The local date of an instant as YYYYMMDD; the years 1 and 9999 included (an
    instant whose local date falls outside them is clamped to the UTC date)."""
    try:
        return instant.astimezone(zone).strftime("%Y%m%d")
    except (OverflowError, ValueError):
        return instant.astimezone(UTC).strftime("%Y%m%d")


class Report:
    def __init__(
        self,
        db: Database,
        account: models.Account,
        r: Range,
        product_id: str,
        *,
        sheet_rows: int = SHEET_ROWS,
    ) -> None:
        if sheet_rows < 2:
            raise ValueError("a sheet holds the header and at least one row")
        self.db = db
        self.account = account
        self.range = r
        self.product_id = product_id
        self.sheet_rows = sheet_rows

    def file_name(self, extension: str) -> str:
        zone = ranges.account_zone(self.account)
        start = _day(self.range.start, zone)
        end = _day(self.range.end, zone)
        return f"usage-{self.account.account_id}-{start}-{end}.{extension}"

    def _rows(self) -> AsyncIterator[list[Any]]:
        return reads.usage_event_rows(self.db, self.account.account_id, self.range, self.product_id)

    async def csv_chunks(self) -> AsyncGenerator[bytes, None]:
        # Lines as the csv module's default dialect writes them (QUOTE_MINIMAL, CRLF);
        # ids, product ids and statuses are validated to [A-Za-z0-9._:-], numbers and
        # timestamps need no quoting, free text is quoted by the csv module itself.
        header = io.StringIO()
        csv.writer(header).writerow(HEADER)
        yield header.getvalue().encode()  # the first bytes, before the query runs
        text = _Memo(_csv_field)
        amount = _Memo(format_amount)
        parts: list[str] = []
        size = 0
        async for rows in reads.usage_event_rows(
            self.db, self.account.account_id, self.range, self.product_id
        ):
            batch = "".join(
                [
                    f"{event_id},{started},{product},{text[endpoint]},{status},{code},"
                    f"{text[message]},{quantity},{amount[credits]},{ms}\r\n"
                    for (
                        event_id,
                        started,
                        product,
                        endpoint,
                        status,
                        code,
                        message,
                        quantity,
                        credits,
                        ms,
                    ) in rows
                ]
            )
            parts.append(batch)
            size += len(batch)
            if size >= CHUNK_BYTES:
                yield "".join(parts).encode()
                parts.clear()
                size = 0
        if parts:
            yield "".join(parts).encode()

    async def xlsx_chunks(self, *, zip64_from: int = 0xFFFFFFFF) -> AsyncGenerator[bytes, None]:
        archive = ZipStream(zip64_from=zip64_from)
        out = _Output()
        for name, content in _FIXED_PARTS:
            out.add(archive.whole(name, content.encode()))
        sheets = ["Usage"]
        out.add(archive.start(_sheet_path(1)))
        out.add(archive.write(_SHEET_START + _header_row()))
        yield out.take()  # the first bytes, before the query runs
        row = 2
        text = _Memo(_text_cell)
        amount = _Memo(format_amount)
        async for rows in reads.usage_event_rows(
            self.db, self.account.account_id, self.range, self.product_id
        ):
            parts: list[str] = []
            for (
                event_id,
                started,
                product,
                endpoint,
                status,
                code,
                message,
                quantity,
                credits,
                ms,
            ) in rows:
                if row > self.sheet_rows:
                    out.add(archive.write("".join(parts).encode() + _SHEET_END))
                    out.add(archive.finish())
                    parts = []
                    sheets.append(f"Usage ({len(sheets) + 1})")
                    out.add(archive.start(_sheet_path(len(sheets))))
                    out.add(archive.write(_SHEET_START + _header_row()))
                    row = 2
                # The ids, product ids and statuses are validated to [A-Za-z0-9._:-].
                parts.append(
                    f'<row r="{row}"><c t="inlineStr"><is><t>{event_id}</t></is></c>'
                    f'<c t="inlineStr"><is><t>{started}</t></is></c>'
                    f'<c t="inlineStr"><is><t>{product}</t></is></c>'
                    f"{text[endpoint]}"
                    f'<c t="inlineStr"><is><t>{status}</t></is></c>'
                    f"<c><v>{code}</v></c>{text[message]}<c><v>{quantity}</v></c>"
                    f"<c><v>{amount[credits]}</v></c><c><v>{ms}</v></c></row>"
                )
                row += 1
            out.add(archive.write("".join(parts).encode()))
            if out.size >= CHUNK_BYTES:
                yield out.take()
        out.add(archive.write(_SHEET_END))
        out.add(archive.finish())
        if out.size:
            yield out.take()

        zone = ranges.account_zone(self.account)
        stats = await reads.usage_stats(
            self.db, self.account.account_id, self.range, "day", zone, self.product_id
        )
        for title, xml in _totals_sheets(stats):
            sheets.append(title)
            out.add(archive.whole(_sheet_path(len(sheets)), xml))
        out.add(archive.whole("xl/workbook.xml", _workbook(sheets)))
        out.add(archive.whole("xl/_rels/workbook.xml.rels", _workbook_rels(len(sheets))))
        out.add(archive.whole("[Content_Types].xml", _content_types(len(sheets))))
        out.add(archive.close())
        yield out.take()


class _Output:
    """Bytes waiting to be sent."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return data


# -- XML ---------------------------------------------------------------------------------

# Characters XML 1.0 cannot hold, written as OOXML's _xHHHH_ escapes (as Excel and
# XlsxWriter do); a literal "_xHHHH_" gets its underscore escaped so it reads back as is.
_SPECIAL = re.compile(r"[&<>\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]|_x[0-9A-Fa-f]{4}_")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _escape(text: str) -> str:
    if _SPECIAL.search(text) is None:
        return text
    text = re.sub(r"(_x[0-9A-Fa-f]{4}_)", r"_x005F\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _CONTROL.sub(lambda m: f"_x{ord(m.group()):04X}_", text)


def _text_cell(text: str) -> str:
    if not text:
        return "<c/>"
    if text[0].isspace() or text[-1].isspace():
        return f'<c t="inlineStr"><is><t xml:space="preserve">{_escape(text)}</t></is></c>'
    return f'<c t="inlineStr"><is><t>{_escape(text)}</t></is></c>'


class _Number(str):
    """A decimal written as a numeric cell, exactly as its text."""

    __slots__ = ()


def _cell(value: Any) -> str:
    if isinstance(value, _Number):
        return f"<c><v>{value}</v></c>"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"unexpected cell {value!r}")
    if isinstance(value, int):
        return f"<c><v>{value}</v></c>"
    return _text_cell(value)


def _row(number: int, values: Iterable[Any]) -> str:
    return f'<row r="{number}">{"".join(_cell(v) for v in values)}</row>'


def _header_row() -> bytes:
    return _row(1, HEADER).encode()


_WIDTHS = [38, 27, 16, 24, 11, 12, 40, 10, 12, 21]
_SHEET_START = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
    '<sheetViews><sheetView workbookViewId="0"><pane ySplit="1" topLeftCell="A2" '
    'activePane="bottomLeft" state="frozen"/></sheetView></sheetViews>'
    "<cols>"
    + "".join(
        f'<col min="{i}" max="{i}" width="{w}" customWidth="1"/>'
        for i, w in enumerate(_WIDTHS, start=1)
    )
    + "</cols><sheetData>"
).encode()
_SHEET_END = b"</sheetData></worksheet>"


def _sheet_path(number: int) -> str:
    return f"xl/worksheets/sheet{number}.xml"


def _totals_sheets(stats: reads.Stats) -> list[tuple[str, bytes]]:
    columns = ["Requests", "Successful", "Failed", "Credits", "Quantity"]

    def numbers(t: reads.Totals) -> list[Any]:
        return [t.requests, t.successful, t.failed, _Number(format_amount(t.credits)), t.quantity]

    by_product = [_row(1, ["Product Id", "Endpoint", *columns])]
    for (product, endpoint), t in sorted(stats.by_product_endpoint.items()):
        by_product.append(_row(len(by_product) + 1, [product, endpoint, *numbers(t)]))
    by_product.append(_row(len(by_product) + 1, ["Total", "", *numbers(stats.total)]))

    daily = [_row(1, ["Date", *columns])]
    for day, t in sorted(stats.by_period.items()):
        daily.append(_row(len(daily) + 1, [day.date().isoformat(), *numbers(t)]))
    daily.append(_row(len(daily) + 1, ["Total", *numbers(stats.total)]))

    def sheet(rows: list[str]) -> bytes:
        return (
            b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
            b"<sheetData>" + "".join(rows).encode() + _SHEET_END
        )

    return [("By product and endpoint", sheet(by_product)), ("Daily", sheet(daily))]


def _workbook(sheets: Sequence[str]) -> bytes:
    entries = "".join(
        f'<sheet name="{_escape(name)}" sheetId="{i}" r:id="rId{i}"/>'
        for i, name in enumerate(sheets, start=1)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
        'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
        f"<sheets>{entries}</sheets></workbook>"
    ).encode()


_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


def _workbook_rels(count: int) -> bytes:
    sheets = "".join(
        f'<Relationship Id="rId{i}" Type="{_REL}/worksheet" Target="worksheets/sheet{i}.xml"/>'
        for i in range(1, count + 1)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'{sheets}<Relationship Id="rId{count + 1}" Type="{_REL}/styles" '
        'Target="styles.xml"/></Relationships>'
    ).encode()


_MAIN = "application/vnd.openxmlformats-officedocument.spreadsheetml"


def _content_types(count: int) -> bytes:
    sheets = "".join(
        f'<Override PartName="/xl/worksheets/sheet{i}.xml" ContentType="{_MAIN}.worksheet+xml"/>'
        for i in range(1, count + 1)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/xl/workbook.xml" ContentType="{_MAIN}.sheet.main+xml"/>'
        f'<Override PartName="/xl/styles.xml" ContentType="{_MAIN}.styles+xml"/>'
        f"{sheets}</Types>"
    ).encode()


_FIXED_PARTS = [
    (
        "_rels/.rels",
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="{_REL}/officeDocument" Target="xl/workbook.xml"/>'
        "</Relationships>",
    ),
    (
        "xl/styles.xml",
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<styleSheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
        '<fonts count="1"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
        "</fonts>"
        '<fills count="2"><fill><patternFill patternType="none"/></fill>'
        '<fill><patternFill patternType="gray125"/></fill></fills>'
        '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border>'
        "</borders>"
        '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>'
        "</cellStyleXfs>"
        '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
        "</cellXfs>"
        '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
        "</styleSheet>",
    ),
]


# -- zip ---------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("compressed", "crc", "method", "name", "offset", "size")

    def __init__(self, name: bytes, offset: int, method: int) -> None:
        self.name = name
        self.offset = offset
        self.method = method
        self.crc = 0
        self.compressed = 0
        self.size = 0


class ZipStream:
    """A zip archive written front to back, one entry at a time, without seeking.

    Each entry's local header carries no sizes (flag bit 3); a data descriptor after its
    data has the CRC and sizes, and the central directory at the end repeats them. Sizes
    and offsets from `zip64_from` (4 GiB - 1 unless a test lowers it) on go to zip64
    fields: the descriptor's sizes become 8 bytes, the central entry gets a zip64 extra
    field, and a zip64 end record precedes the classic one (as Go's archive/zip writes
    streams). Every method returns the bytes to send next.
    """

    def __init__(self, *, zip64_from: int = 0xFFFFFFFF, level: int = DEFLATE_LEVEL) -> None:
        self.zip64_from = zip64_from
        self.level = level
        self.offset = 0
        self.entries: list[_Entry] = []
        self.current: _Entry | None = None
        self._deflate: Any = None
        t = time.gmtime()
        self._time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
        self._date = ((max(t.tm_year, 1980) - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday

    def _emit(self, data: bytes) -> bytes:
        self.offset += len(data)
        return data

    def start(self, name: str) -> bytes:
        assert self.current is None, "finish the entry first"
        encoded = name.encode()
        self.current = _Entry(encoded, self.offset, 8)
        self._deflate = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        header = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            20,  # version needed: 2.0 (deflate)
            0x0808,  # bit 3: sizes in the data descriptor; bit 11: UTF-8 names
            8,
            self._time,
            self._date,
            0,
            0,
            0,
            len(encoded),
            0,
        )
        return self._emit(header + encoded)

    def write(self, data: bytes) -> bytes:
        entry = self.current
        assert entry is not None
        entry.crc = zlib.crc32(data, entry.crc)
        entry.size += len(data)
        out: bytes = self._deflate.compress(data)
        entry.compressed += len(out)
        return self._emit(out)

    def finish(self) -> bytes:
        entry = self.current
        assert entry is not None
        tail: bytes = self._deflate.flush()
        entry.compressed += len(tail)
        self.current = None
        self._deflate = None
        self.entries.append(entry)
        if self._zip64(entry.compressed, entry.size):
            descriptor = struct.pack("<IIQQ", 0x08074B50, entry.crc, entry.compressed, entry.size)
        else:
            descriptor = struct.pack("<IIII", 0x08074B50, entry.crc, entry.compressed, entry.size)
        return self._emit(tail) + self._emit(descriptor)

    def whole(self, name: str, data: bytes) -> bytes:
        return self.start(name) + self.write(data) + self.finish()

    def _zip64(self, *values: int) -> bool:
        return any(v >= self.zip64_from for v in values)

    def close(self) -> bytes:
        assert self.current is None, "finish the entry first"
        directory_offset = self.offset
        directory = bytearray()
        for e in self.entries:
            extra = b""
            sizes = (e.compressed, e.size)
            if self._zip64(e.compressed, e.size, e.offset):
                # Each field is present when its classic field is 0xFFFFFFFF, in order.
                fields = [e.size, e.compressed] if self._zip64(*sizes) else []
                if self._zip64(e.offset):
                    fields.append(e.offset)
                extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields)
            big_sizes = self._zip64(*sizes)
            directory += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                (3 << 8) | 45,  # made by: Unix, 4.5
                45 if extra else 20,
                0x0808,
                e.method,
                self._time,
                self._date,
                e.crc,
                0xFFFFFFFF if big_sizes else e.compressed,
                0xFFFFFFFF if big_sizes else e.size,
                len(e.name),
                len(extra),
                0,
                0,
                0,
                0o100644 << 16,
                0xFFFFFFFF if self._zip64(e.offset) else e.offset,
            )
            directory += e.name + extra
        out = self._emit(bytes(directory))
        size = len(directory)
        count = len(self.entries)
        if self._zip64(directory_offset, size) or count >= 0xFFFF:
            end64_offset = self.offset
            out += self._emit(
                struct.pack(
                    "<IQHHIIQQQQ",
                    0x06064B50,
                    44,
                    (3 << 8) | 45,
                    45,
                    0,
                    0,
                    count,
                    count,
                    size,
                    directory_offset,
                )
            )
            out += self._emit(struct.pack("<IIQI", 0x07064B50, 0, end64_offset, 1))
            count = min(count, 0xFFFF)
            size = min(size, 0xFFFFFFFF)
            directory_offset = min(directory_offset, 0xFFFFFFFF)
            if self._zip64(size):
                size = 0xFFFFFFFF
            if self._zip64(directory_offset):
                directory_offset = 0xFFFFFFFF
        out += self._emit(
            struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, directory_offset, 0)
        )
        return out
