"""The fingerprint of a request: what "the same payload" means for an idempotency key."""

import hashlib

from google.protobuf.message import Message


def of(method: str, request: Message) -> bytes:
    """SHA-256 of the method name and the request without its request_id (if it has one).

    Deterministic serialisation orders map entries (Struct fields), so equal requests
    give equal bytes within one protobuf runtime.
    """
    payload = request
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        payload = type(request)()
        payload.CopyFrom(request)
        payload.ClearField("request_id")
    digest = hashlib.sha256(method.encode())
    digest.update(b"\x00")
    digest.update(payload.SerializeToString(deterministic=True))
    return digest.digest()
