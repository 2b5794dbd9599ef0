"""Checks of request fields that raise InvalidArgument naming the field.

Every limit a caller can meet is here, so the documentation and the code agree.
"""

import functools
import json
import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import available_timezones

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from tally_service.errors import InvalidArgument, quote

_ACCOUNT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CURRENCY = re.compile(r"[A-Z0-9_]{1,16}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

MAX_METADATA_BYTES = 16 * 1024
MAX_REFERENCE_CHARS = 256
MAX_DESCRIPTION_CHARS = 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
DEFAULT_TTL_SECONDS = 300
MAX_TTL_SECONDS = 7 * 24 * 3600


def account_id(value: str, field: str = "account_id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not _ACCOUNT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
    return value


def request_id(value: str) -> str:
    if not value:
        raise InvalidArgument("request_id", "required (an idempotency key, e.g. a UUID)")
    if not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument("request_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return value


def reservation_id(value: str, field: str = "reservation_id") -> str:
    return uuid_id(value, field)


def uuid_id(value: str, field: str) -> str:
    """A server-assigned id (a UUID), lower-cased."""
    if not value:
        raise InvalidArgument(field, "required")
    if not _UUID.fullmatch(value):
        raise InvalidArgument(field, "must be a UUID")
    return value.lower()


def text(value: str, field: str, max_chars: int, *, required: bool = False) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "required")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def metadata(value: struct_pb2.Struct, field: str = "metadata") -> str:
    """Returns the Struct as JSON text for a jsonb column, bounded in size."""
    if not value.fields:
        return "{}"
    as_dict: dict[str, Any] = json_format.MessageToDict(value)
    encoded = json.dumps(as_dict, separators=(",", ":"), sort_keys=True)
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidArgument(field, f"at most {MAX_METADATA_BYTES} bytes as JSON")
    if "\\u0000" in encoded:
        raise InvalidArgument(field, "must not contain NUL characters")
    return encoded


@functools.cache
def _time_zones() -> frozenset[str]:
    """The IANA names zoneinfo lists (read once: it walks the time zone files). ZoneInfo
    also loads files that are not zones: "posixrules", the "posix/" and "right/" trees,
    and "localtime", which is the host's own zone, not a place."""
    return frozenset(available_timezones() - {"localtime"})


def known_time_zone(value: str) -> bool:
    """Whether the name is an IANA time zone zoneinfo lists."""
    return value in _time_zones()


def time_zone(value: str) -> str:
    """An IANA time zone name (the database must know it too: tally_create_account and
    tally_update_account refuse one its time zone data lacks)."""
    if not value:
        return "UTC"
    if not known_time_zone(value):
        raise InvalidArgument("time_zone", f"{quote(value)} is not an IANA time zone")
    return value


def currency(value: str) -> str:
    if not value:
        return "CREDIT"
    if not _CURRENCY.fullmatch(value):
        raise InvalidArgument("currency", "must be 1 to 16 characters of A-Z 0-9 _")
    return value


def email(value: str) -> str:
    text(value, "email", 320)
    if value and ("@" not in value or any(c.isspace() for c in value)):
        raise InvalidArgument("email", "must look like name@domain")
    return value


def page_size(value: int) -> int:
    """AIP-158: 0 means the default, above the maximum is the maximum, negative is an error."""
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def ttl_seconds(value: int) -> int:
    if value < 0:
        raise InvalidArgument("ttl_seconds", "must not be negative")
    if value == 0:
        return DEFAULT_TTL_SECONDS
    if value > MAX_TTL_SECONDS:
        raise InvalidArgument("ttl_seconds", f"at most {MAX_TTL_SECONDS}")
    return value


# Every instant the API accepts lies in [MIN_TIME, MAX_TIME): far enough inside the
# range of Python's datetime and of PostgreSQL that any later read can serve it (its
# local date in any time zone, the next day, month or year after it, a file name).
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9998, 1, 1, tzinfo=UTC)
TIME_RANGE = "must lie from 1970-01-01T00:00:00Z up to (not including) 9998-01-01T00:00:00Z"


def instant(value: datetime, field: str) -> datetime:
    """The instant if it lies in the accepted range, else InvalidArgument naming field."""
    if value.tzinfo is None or not MIN_TIME <= value < MAX_TIME:
        raise InvalidArgument(field, TIME_RANGE)
    return value


def optional_time(
    message: Any, field: str, value: timestamp_pb2.Timestamp, *, name: str | None = None
) -> datetime | None:
    """The timestamp if the field is set, else None; `name` is the field's path in the
    request when it is not `field` itself (e.g. "event.start_time")."""
    if not message.HasField(field):
        return None
    try:
        as_datetime = value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(name or field, TIME_RANGE) from None
    return instant(as_datetime, name or field)


_EVENT_ID = _REQUEST_ID
_PRODUCT_ID = _ACCOUNT_ID


def event_id(value: str, field: str = "event.event_id") -> str:
    if not value:
        raise InvalidArgument(field, "required (the caller's transaction id)")
    if not _EVENT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return value


def product_id(value: str, field: str = "product_id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not _PRODUCT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
    return value
