"""One catalog of error reasons: tally.v1.ErrorReason. The server's errors and the
client's typed exceptions derive their reason strings from it, and each side covers it."""

import re
from pathlib import Path

import grpc

from tally.v1 import error_reason_pb2
from tally_client import errors as client_errors
from tally_service import auth, errors

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "ERROR_REASON_"
ENUM = {
    name.removeprefix(PREFIX): number
    for name, number in error_reason_pb2.ErrorReason.items()
    if number != error_reason_pb2.ERROR_REASON_UNSPECIFIED
}


def subclasses(cls: type[errors.DomainError]) -> list[type[errors.DomainError]]:
    found: list[type[errors.DomainError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


def server_reasons() -> dict[str, grpc.StatusCode]:
    """Every reason the server can raise, with its status code."""
    assert auth.Unauthenticated in subclasses(errors.DomainError)
    reasons = {errors.DomainError.reason: errors.DomainError.code}
    for cls in subclasses(errors.DomainError):
        if cls is not errors.NotFound:
            reasons[cls.reason] = cls.code
    for reason in errors.NOT_FOUND_REASONS.values():
        reasons[reason] = grpc.StatusCode.NOT_FOUND
    return reasons


def test_every_value_is_prefixed_and_documented() -> None:
    text = (ROOT / "protos" / "tally" / "v1" / "error_reason.proto").read_text()
    for name, _ in error_reason_pb2.ErrorReason.items():
        assert name.startswith(PREFIX)
        # Each value has a comment line right above it.
        assert re.search(rf"//[^\n]*\n  {name} = ", text), name


def test_every_server_reason_is_in_the_enum_and_every_value_is_raised() -> None:
    reasons = server_reasons()
    assert set(reasons) == set(ENUM)


def test_every_resource_not_found_has_a_reason() -> None:
    named = set()
    for path in (ROOT / "service" / "tally_service" / "sql").glob("*.sql"):
        text = path.read_text()
        named |= set(re.findall(r"tally_not_found\('([a-z_]+)'", text))
        named |= set(re.findall(r"'resource', '([a-z_]+)'", text))
    for path in (ROOT / "service" / "tally_service").rglob("*.py"):
        named |= set(re.findall(r'NotFound\("([a-z_ ]+)"', path.read_text()))
    assert named <= set(errors.NOT_FOUND_REASONS), named - set(errors.NOT_FOUND_REASONS)
    for resource in named:
        assert errors.NotFound(resource, "x").reason in ENUM


def test_every_value_maps_to_a_client_class() -> None:
    server = server_reasons()
    for reason in ENUM:
        cls = client_errors.error_class(server[reason], reason)
        specific = cls.grpc_reason == reason
        generic = client_errors.GENERIC_REASONS.get(reason) is cls
        assert specific != generic, (reason, cls)
        assert cls.grpc_code == server[reason], reason
    # The classes derived from the enum use its names.
    assert client_errors.InsufficientCredits.grpc_reason == client_errors.reason_of(
        error_reason_pb2.ERROR_REASON_INSUFFICIENT_CREDITS
    )
    assert errors.InsufficientCredits.reason == "INSUFFICIENT_CREDITS"
