"""Opaque keyset page tokens (AIP-158).

A token carries the last key of the page and a digest of the filters it was issued for,
so a token reused with other filters is INVALID_ARGUMENT rather than a wrong page.
"""

import base64
import hashlib
import json
from typing import Any

from tally_service.errors import InvalidArgument


def _digest(filters: Any) -> str:
    encoded = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def encode(last_key: Any, filters: Any) -> str:
    body = json.dumps({"k": last_key, "f": _digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(token: str, filters: Any) -> Any:
    """The last key carried by the token, or None for an empty token."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key, digest = body["k"], body["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    if digest != _digest(filters):
        raise InvalidArgument("page_token", "the token was issued for other filters")
    return key
