"""The fingerprint of a request: what "the same payload" means for an idempotency key."""

import hashlib

from google.protobuf.message import Message


def of(method: str, request: Message) -> bytes:
    """SHA-256 of the method name and the request without its request_id (if it has one).

    Deterministic serialisation orders map entries (Struct fields), so equal requests
    give equal bytes within one protobuf runtime. The request_id is cleared for the
    serialisation and put back (no copy of the request is made).
    """
    digest = hashlib.sha256(method.encode())
    digest.update(b"\x00")
    request_id = ""
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        request_id = getattr(request, "request_id")  # noqa: B009
    if request_id:
        request.ClearField("request_id")
        try:
            digest.update(request.SerializeToString(deterministic=True))
        finally:
            setattr(request, "request_id", request_id)  # noqa: B010
    else:
        digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()
