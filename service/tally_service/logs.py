"""Logging: JSON lines (one object a line) or readable text, on standard error.

``TALLY_LOG_FORMAT=json`` (the image's and the chart's default) writes each record as one
JSON object: ``time`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger``,
``message``, then the record's extras (``log.info("...", extra={"key": value})``); an
exception is a field too (``exception``: its type and message, ``traceback``: the whole
traceback as one string), so every record is exactly one line. ``text`` (the default when
run by hand) is one readable line per record, tracebacks below it.

Libraries that talk a lot at INFO (pgserver, the embedded PostgreSQL's manager, and
Alembic) log at WARNING and above unless ``TALLY_LOG_LEVEL=DEBUG``. Python warnings are
logged too (logger ``py.warnings``), so that nothing unstructured reaches standard error.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

QUIET_LIBRARIES = ("pgserver", "alembic")

# The attributes every LogRecord has; anything else on a record is an extra.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            kind, exc, tb = record.exc_info
            entry["exception"] = f"{kind.__name__}: {exc}"
            entry["traceback"] = "".join(traceback.format_exception(kind, exc, tb))
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value ...`` (tracebacks on the lines below)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, rest = line.partition("\n")
        pairs = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} {pairs}{sep}{rest}"


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configures the root logger: one handler on standard error, `fmt` json or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(quiet, logging.getLevelName(level)))
    logging.captureWarnings(True)
