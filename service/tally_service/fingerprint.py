"""The fingerprint of a request: what "the same payload" means for an idempotency key."""

import hashlib
from typing import Any

from google.protobuf.message import Message

# Per method: the digest of its name and the separator, copied for each request (usage
# events are fingerprinted one by one, up to 1,000 a call). Per message type: whether it
# has a request_id.
_PREFIXES: dict[str, Any] = {}
_HAS_REQUEST_ID: dict[type, bool] = {}


def of(method: str, request: Message) -> bytes:
    """SHA-256 of the method name and the request without its request_id (if it has one).

    Deterministic serialisation orders map entries (Struct fields), so equal requests
    give equal bytes within one protobuf runtime. The request_id is cleared for the
    serialisation and put back (no copy of the request is made).
    """
    prefix = _PREFIXES.get(method)
    if prefix is None:
        prefix = _PREFIXES[method] = hashlib.sha256(method.encode() + b"\x00")
    digest = prefix.copy()
    kind = type(request)
    has_request_id = _HAS_REQUEST_ID.get(kind)
    if has_request_id is None:
        has_request_id = _HAS_REQUEST_ID[kind] = "request_id" in request.DESCRIPTOR.fields_by_name
    request_id = getattr(request, "request_id") if has_request_id else ""  # noqa: B009
    if request_id:
        request.ClearField("request_id")
        try:
            digest.update(request.SerializeToString(deterministic=True))
        finally:
            setattr(request, "request_id", request_id)  # noqa: B010
    else:
        digest.update(request.SerializeToString(deterministic=True))
    result: bytes = digest.digest()
    return result
