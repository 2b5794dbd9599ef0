"""Opaque keyset page tokens (AIP-158).

A token carries the last key of the page and a digest of the filters it was issued for,
so a token reused with other filters is INVALID_ARGUMENT rather than a wrong page.

A token comes back from the caller, who may have edited it: `decode` checks the key
against the kinds its list method issued (an integer in BIGINT range, a bounded text, an
instant in the accepted range, a UUID), so that whatever a token carries, a forged one
is INVALID_ARGUMENT naming `page_token` and never reaches the database.
"""

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from tally_service import validation
from tally_service.errors import InvalidArgument

FIELD = "page_token"
# Tokens Tally issues are far shorter; a longer one is not one of ours.
MAX_TOKEN_CHARS = 2048
MAX_TEXT_CHARS = 256
BIGINT_MAX = 2**63 - 1

Kind = Callable[[Any], Any]
R = TypeVar("R")


def _malformed() -> InvalidArgument:
    return InvalidArgument(FIELD, "malformed page token")


def integer(value: Any) -> int:
    """A positive integer in BIGINT range (a sequence or an id)."""
    if type(value) is not int or not 0 < value <= BIGINT_MAX:
        raise _malformed()
    return value


def short_text(value: Any) -> str:
    """A short text PostgreSQL can compare (no NUL, valid UTF-8)."""
    if type(value) is not str or len(value) > MAX_TEXT_CHARS or "\x00" in value:
        raise _malformed()
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        raise _malformed() from None
    return value


def instant(value: Any) -> datetime:
    """An ISO 8601 instant with an offset, in the range the API accepts."""
    if type(value) is not str or len(value) > 64:
        raise _malformed()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _malformed() from None
    if parsed.tzinfo is None or not validation.MIN_TIME <= parsed < validation.MAX_TIME:
        raise _malformed()
    return parsed


def small_integer(value: Any) -> int:
    """Any integer in INTEGER (int32) range, such as a grant's priority."""
    if type(value) is not int or not -(2**31) <= value < 2**31:
        raise _malformed()
    return value


def optional_instant(value: Any) -> datetime | None:
    """An instant, or null for none (a grant without expiry)."""
    return None if value is None else instant(value)


def uuid_text(value: Any) -> str:
    """A UUID, as its canonical text."""
    if type(value) is not str or len(value) > 64:
        raise _malformed()
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _malformed() from None


def _digest(filters: Any) -> str:
    encoded = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def encode(last_key: Any, filters: Any) -> str:
    body = json.dumps({"k": last_key, "f": _digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(token: str, filters: Any, kind: Kind, *more: Kind) -> tuple[Any, ...] | None:
    """The last key carried by the token, one checked value per kind (a one-kind key is
    encoded as the value itself, a longer one as a list), or None for an empty token.
    At least one kind is required: an unchecked key is what this function prevents."""
    kinds = (kind, *more)
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise _malformed()
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key, digest = body["k"], body["f"]
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        raise _malformed() from None
    if type(digest) is not str or digest != _digest(filters):
        raise InvalidArgument(FIELD, "the token was issued for other filters")
    values = [key] if len(kinds) == 1 else key
    if type(values) is not list or len(values) != len(kinds):
        raise _malformed()
    return tuple(kind(value) for kind, value in zip(kinds, values, strict=True))


def decode_newest_first(token: str, filters: Any) -> tuple[datetime, str] | None:
    """The keyset of a newest-first page token: (instant, UUID text), or None for the first
    page."""
    key = decode(token, filters, instant, uuid_text)
    return (key[0], key[1]) if key else None


def newest_first_page(
    rows: list[R], limit: int, filters: Any, key_of: Callable[[R], tuple[datetime, Any]]
) -> tuple[list[R], str]:
    """The page of `rows` (fetched with `limit + 1`) and the token of the next one (empty
    when none follows): the last row's (instant, id) bound to the filters."""

    def key(row: R) -> list[Any]:
        at, row_id = key_of(row)
        return [at.isoformat(), str(row_id)]

    return page(rows, limit, filters, key)


def page(
    rows: list[R], limit: int, filters: Any, key_of: Callable[[R], Any]
) -> tuple[list[R], str]:
    """The page of `rows` (fetched with `limit + 1`) and the token of the next one (empty
    when none follows), carrying the last row's key bound to the filters: one JSON value
    for a one-kind key, a list of them for a longer one (as `decode` reads it back)."""
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode(key_of(rows[-1]), filters)
