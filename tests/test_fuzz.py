"""Fuzz of every RPC of every service (DESIGN.md 11: no input is an internal error).

The RPCs are found by iterating the service descriptors, so a new RPC is fuzzed without
touching this file. Requests are built from the request descriptor: edge values for
every field type (integers at their bounds, empty, huge, unicode and NUL strings,
extreme and invalid timestamps, unknown enum numbers, nested messages, random and
forged page tokens), mixed with valid-looking values that point at real accounts,
products, holds and events, so that mutations really happen. Also raw bytes that are not
a valid message at all.

After every call: the status is never INTERNAL or UNKNOWN, an INVALID_ARGUMENT names a
field and is small, and the server stays SERVING. For every mutation:
(i) the same request again (same request id or event id) answers OK with the same
response when the first answered OK (acknowledged means committed, exactly once:
DESIGN.md 7, 8), and never INTERNAL after an error (a failed request left no trace:
DESIGN.md 9);
(ii) after a mutation succeeds, every read of the account answers (what the API
accepts, every later read can serve), and VerifyAccount finds it consistent
(DESIGN.md 1-5).
"""

import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.v1 import ledger_pb2, metering_pb2
from tally_client import TallyClient
from tally_service import pagination
from tests.conftest import ServerProcess
from tests.rpc import NOT_SERVED, Outcome, invoke, message_class, method, methods
from tests.support import scaled

FD = descriptor.FieldDescriptor
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
MAX_STATUS_BYTES = 4096
MAX_DEPTH = 3

INT_BOUNDS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_STRINGS = [
    "",
    " ",
    "a",
    "\x00",
    "a\x00b",
    "é",
    "💸",
    "\u202e",
    "\ufeff",
    "-1",
    "0",
    "NaN",
    "null",
    "../../etc/passwd",
    "%s%n",
    "'; DROP TABLE accounts; --",
    "x" * 257,
    "x" * 100_000,
]
AMOUNTS = [
    "1",
    "0.5",
    "2.95",
    "0.000001",
    "0",
    "-1",
    "-0.000001",
    "+1",
    "1e3",
    "1.0000001",
    "1000000000",
    "1000000000.000001",
    "9" * 40,
    " 1",
    "\u0661",
]
ZONES = [
    "UTC",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
    "Australia/Lord_Howe",
    "localtime",
    "posixrules",
    "Factory",
    "EST5EDT",
    "Nowhere/Else",
    "../UTC",
]
AMOUNT_FIELDS = {
    "amount",
    "credits",
    "threshold",
    "overdraft_limit",
    "credits_per_unit",
    "minimum_charge",
    "credits_per_period",
    "max_amount_per_month",
}
ACCOUNT_PATHS = [
    "email",
    "display_name",
    "name",
    "time_zone",
    "overdraft_limit",
    "trial_end_time",
    "currency",
]


ACCOUNT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def is_map(f: Any) -> bool:
    return bool(f.message_type is not None and f.message_type.GetOptions().map_entry)


def is_mutation(m: descriptor.MethodDescriptor) -> bool:
    """Mutations carry an idempotency key: a request id, or events with event ids."""
    names = set(m.input_type.fields_by_name)
    return bool(names & {"request_id", "event", "events", "event_id"})


@dataclass
class World:
    """What the fuzz has seen: real ids that make requests valid-looking."""

    accounts: list[str]
    products: list[str]
    created: list[str] = field(default_factory=list)  # accounts CreateAccount made
    holds: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (account, event id)
    entries: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def learn(self, response: Any) -> None:
        """Collects ids from a response (recursively), to reuse them in later requests."""
        if not isinstance(response, message.Message):
            return
        for f, value in response.ListFields():
            if is_map(f):
                continue
            values = value if f.is_repeated else [value]
            for v in values:
                if f.type == FD.TYPE_MESSAGE:
                    self.learn(v)
                elif f.name == "reservation_id" and v and v not in self.holds:
                    self.holds.append(v)
                elif f.name == "entry_id" and v and v not in self.entries:
                    self.entries.append(v)
                elif f.name == "next_page_token" and v:
                    self.tokens.append(v)
            if response.DESCRIPTOR.full_name == "tally.v1.Account":
                created: Any = response
                if created.account_id not in self.accounts + self.created:
                    self.created.append(created.account_id)
            if response.DESCRIPTOR.full_name == "tally.v1.UsageEvent":
                event: Any = response
                pair = (event.account_id, event.event_id)
                if pair[1] and pair not in self.events:
                    self.events.append(pair)
        del self.tokens[:-20]


def forged_token(key: Any) -> str:
    body = json.dumps({"k": key, "f": pagination._digest("accounts")}).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


# Offsets from now are drawn, not instants: what Hypothesis draws must not depend on
# when it draws (a replay would draw differently).
NOW = int(datetime.now(UTC).timestamp())


def timestamps(valid: bool = False) -> st.SearchStrategy[tuple[int, int]]:
    if valid:  # around now: backdated a little, or a little ahead
        return st.tuples(
            st.integers(-2 * 86400, 60).map(lambda offset: NOW + offset),
            st.integers(0, 999_999_999),
        )
    return st.one_of(
        st.sampled_from(
            [
                (-62135596800, 0),  # 0001-01-01T00:00:00Z
                (253402300799, 999_999_999),  # 9999-12-31T23:59:59.999999999Z
                (253402300800, 0),
                (-62135596801, 0),
                (0, 0),
                (-1, 0),
                (0, -1),
                (0, 1_000_000_000),
                (2**63 - 1, 0),
                (-(2**63), 0),
                (252423993600, 0),  # 9968-12-31: near the accepted maximum
                (253370764800, 0),  # 9998-01-01: the first refused instant
            ]
        ),
        st.tuples(
            st.integers(-50 * 86400, 400 * 86400).map(lambda offset: NOW + offset),
            st.integers(0, 999_999_999),
        ),
        st.tuples(st.integers(-62135596800, 253402300799), st.just(0)),
    )


def one_of_seen(seen: list[Any], otherwise: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of the values seen so far (they change from run to run, so an index is drawn
    and mapped at use), else `otherwise`."""
    return st.tuples(st.integers(0, 2**16), otherwise).map(
        lambda drawn: seen[drawn[0] % len(seen)] if seen else drawn[1]
    )


VALID_AMOUNTS = ["1", "0.5", "2.95", "0.000001", "10", "-0.5"]


def strings(world: World, name: str, valid: bool = False) -> st.SearchStrategy[str]:
    edge = st.one_of(st.sampled_from(EDGE_STRINGS), st.text(max_size=12))
    fresh = st.builds(lambda: str(uuid.uuid4()))
    hinted: st.SearchStrategy[str] | None = None
    if name == "account_id":
        hinted = st.one_of(
            st.sampled_from(world.accounts),
            one_of_seen(world.created, st.sampled_from(world.accounts)),
            st.builds(lambda: f"fz-new-{uuid.uuid4().hex[:12]}"),
        )
    elif name in ("request_id", "idempotency_key"):
        hinted = fresh
    elif name == "product_id":
        hinted = st.sampled_from(world.products)
    elif name == "reservation_id":
        hinted = one_of_seen(world.holds, fresh)
    elif name == "event_id":
        hinted = st.one_of(fresh, one_of_seen([e for _, e in world.events], fresh))
    elif name == "page_token":
        hinted = st.one_of(
            one_of_seen(world.tokens, st.just("")),
            st.sampled_from([2**63, 10**30, True, None, "x", [1, 2, 3], {}]).map(forged_token),
            st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=40),
        )
    elif name in AMOUNT_FIELDS:
        hinted = st.sampled_from(VALID_AMOUNTS if valid else AMOUNTS)
    elif name == "time_zone":
        hinted = st.sampled_from(ZONES)
    elif name == "currency":
        hinted = st.sampled_from(["CREDIT", "USD", "usd", "X" * 17])
    elif name == "email":
        hinted = st.sampled_from(["ops@acme.test", "no-at-sign", "a @b"])
    elif name == "paths":
        hinted = st.sampled_from(ACCOUNT_PATHS)
    elif name in ("reason", "description", "plan", "display_name", "name", "endpoint"):
        hinted = st.sampled_from(["fuzz", "PAN-Plus", "/v1/verify"])
    if valid:
        return hinted if hinted is not None else st.sampled_from(["fuzz", "", "é"])
    if hinted is None:
        return edge
    return st.one_of(hinted, hinted, hinted, edge)


def struct_values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**53), 2**53),
        st.sampled_from(EDGE_STRINGS[:15]),
    )
    return st.recursive(leaf, lambda inner: st.dictionaries(st.text(max_size=5), inner, max_size=3))


class Builder:
    """Fills a request message field by field. A `valid` builder draws valid-looking
    values only (real ids, amounts, times near now, known enum values), so that
    mutations succeed and the reads after them are exercised."""

    def __init__(self, world: World, data: st.DataObject, valid: bool) -> None:
        self.world = world
        self.data = data
        self.valid = valid

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def fill(self, target: message.Message, depth: int = 0) -> message.Message:
        d = target.DESCRIPTOR
        if d.full_name == "google.protobuf.Timestamp":
            seconds, nanos = self.draw(timestamps(self.valid))
            target.seconds, target.nanos = seconds, nanos  # type: ignore[attr-defined]
            return target
        if d.full_name == "google.protobuf.Struct":
            value = self.draw(st.dictionaries(st.text(max_size=8), struct_values(), max_size=4))
            target.update(value)  # type: ignore[attr-defined]
            if not self.valid and self.draw(st.integers(0, 20)) == 0:
                target.update({"big": "x" * 20_000})  # type: ignore[attr-defined]
            return target
        for f in d.fields:
            likely = f.name in (
                "account_id",
                "request_id",
                "product_id",
                "event_id",
                "event",
                "events",
                "amount",
                "reason",
                "account",
                "settings",
                "subscription",
                "product",
                "reservation_id",
                "credits_per_unit",
                "plan",
                "credits_per_period",
                "period",
            )
            if f.name == "page_token" and self.valid:
                likely = False
            if not self.draw(st.integers(0, 9)) < (
                10 if likely and self.valid else 9 if likely else 5
            ):
                continue
            if f.is_repeated:
                count = self.draw(st.integers(0, 3))
                container: Any = getattr(target, f.name)
                if is_map(f):
                    continue  # no request carries a map; responses do
                for _ in range(count):
                    if f.type == FD.TYPE_MESSAGE:
                        if depth < MAX_DEPTH:
                            self.fill(container.add(), depth + 1)
                    else:
                        container.append(self.scalar(f))
                continue
            if f.type == FD.TYPE_MESSAGE:
                if depth < MAX_DEPTH:
                    self.fill(getattr(target, f.name), depth + 1)
                    if not getattr(target, f.name).ListFields():
                        getattr(target, f.name).SetInParent()
                continue
            setattr(target, f.name, self.scalar(f))
        return target

    def scalar(self, f: Any) -> Any:
        if f.type == FD.TYPE_STRING:
            return self.draw(strings(self.world, f.name, self.valid))
        if f.type == FD.TYPE_BYTES:
            return self.draw(st.binary(max_size=64))
        if f.type == FD.TYPE_BOOL:
            return self.draw(st.booleans())
        if f.type == FD.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            if self.valid:
                return self.draw(st.sampled_from(known))
            return self.draw(st.sampled_from([*known, *known, -1, 99, 2**31 - 1]))
        if f.type in INT_BOUNDS:
            low, high = INT_BOUNDS[f.type]
            if self.valid:
                return self.draw(st.integers(0, 5))
            small = st.integers(max(low, -3), 50)
            if f.name == "entry_id":
                small = one_of_seen(self.world.entries, small)
            return self.draw(st.one_of(small, small, st.sampled_from([low, high, low + 1])))
        if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return self.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
        raise AssertionError(f"no strategy for {f.full_name}")


def assert_answered(m: descriptor.MethodDescriptor, outcome: Outcome) -> None:
    where = f"{m.full_name}: {outcome.code} {outcome.details[:300]!r}"
    assert outcome.code not in NEVER, where
    if m.containing_service.full_name in NOT_SERVED:
        assert outcome.code == grpc.StatusCode.UNIMPLEMENTED, where
        return
    assert outcome.code != grpc.StatusCode.UNIMPLEMENTED, where
    assert outcome.size() < MAX_STATUS_BYTES, (where, outcome.size())
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.fields(), f"{where}: names no field"


def normalised(outcome: Outcome) -> list[Any]:
    """The responses with what a replay may report differently cleared: the duplicate
    flag (and a stream's split between recorded and duplicate)."""
    result = []
    for response in outcome.responses:
        copy = type(response)()
        copy.CopyFrom(response)
        _clear_duplicates(copy)
        result.append(copy)
    return result


def _clear_duplicates(m: message.Message) -> None:
    if m.DESCRIPTOR.full_name == "tally.v1.StreamUsageResponse":
        m.recorded += m.duplicates  # type: ignore[attr-defined]
        m.duplicates = 0  # type: ignore[attr-defined]
    for f, value in m.ListFields():
        if f.name == "duplicate":
            m.ClearField(f.name)
        elif is_map(f):
            continue
        elif f.type == FD.TYPE_MESSAGE and f.is_repeated:
            for item in value:
                _clear_duplicates(item)
        elif f.type == FD.TYPE_MESSAGE:
            _clear_duplicates(value)


def accounts_in(request: Any, world: World) -> set[str]:
    found: set[str] = set()

    def scan(m: message.Message) -> None:
        for f, value in m.ListFields():
            if is_map(f):
                continue
            values = value if f.is_repeated else [value]
            for v in values:
                if f.type == FD.TYPE_MESSAGE:
                    scan(v)
                elif f.name == "account_id" and ACCOUNT_ID.fullmatch(v):
                    found.add(v)

    for r in request if isinstance(request, list) else [request]:
        scan(r)
    fields = request.DESCRIPTOR.fields_by_name if isinstance(request, message.Message) else {}
    if not found and "reservation_id" in fields:
        found = set(world.accounts)  # the hold's account
    return found


def reads(account_id: str) -> list[tuple[str, message.Message]]:
    requests: list[tuple[str, message.Message]] = [
        (name, message_class(method(name).input_type)(account_id=account_id))
        for name in (
            "GetAccount",
            "GetBalance",
            "ListEntries",
            "GetAccountSummary",
            "GetUsageSummary",
            "ListUsageEvents",
            "ListGrants",
            "ListReloads",
            "ListReservations",
        )
    ]
    requests.append(
        (
            "GetUsage",
            metering_pb2.GetUsageRequest(
                account_id=account_id,
                period=metering_pb2.USAGE_PERIOD_DAILY,
                time_range=metering_pb2.UsageRange(preset=metering_pb2.RANGE_PRESET_LAST_30_DAYS),
            ),
        )
    )
    requests.append(
        (
            "ExportUsageReport",
            metering_pb2.ExportUsageReportRequest(
                account_id=account_id,
                format=metering_pb2.REPORT_FORMAT_CSV,
                time_range=metering_pb2.UsageRange(preset=metering_pb2.RANGE_PRESET_LAST_7_DAYS),
            ),
        )
    )
    requests.append(
        ("ListEntries", ledger_pb2.ListEntriesRequest(account_id=account_id, page_size=1))
    )
    return requests


def assert_reads_serve(channel: grpc.Channel, account_id: str, world: World) -> None:
    """Every read of an account that exists answers OK (not merely "not INTERNAL"):
    whatever a mutation stored, a later read can serve."""
    exists = False
    for name, request in reads(account_id):
        outcome = invoke(channel, method(name), request)
        assert outcome.code not in NEVER, (name, account_id, outcome.code, outcome.details)
        if name == "GetAccount":
            exists = outcome.ok
        elif exists:
            assert outcome.ok, (name, account_id, outcome.code, outcome.details)
        world.learn(outcome.response)
        token = getattr(outcome.response, "next_page_token", "")
        if token:  # the next page, through the token the server issued
            request.page_token = token  # type: ignore[attr-defined]
            following = invoke(channel, method(name), request)
            assert following.ok, (name, "page 2", following.code, following.details)
    verify = invoke(
        channel, method("VerifyAccount"), ledger_pb2.VerifyAccountRequest(account_id=account_id)
    )
    assert verify.code not in NEVER, verify.details
    if verify.ok:
        assert verify.response.consistent, list(verify.response.violations)


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.target, options=options) as c:
        yield c


@pytest.fixture(scope="module")
def world(client: TallyClient) -> World:
    tag = uuid.uuid4().hex[:8]
    plain, la = f"fz-{tag}", f"fz-la-{tag}"
    client.create_account(plain)
    client.top_up(plain, "1000")
    client.create_account(la, time_zone="America/Los_Angeles", overdraft_limit="5")
    client.top_up(la, "50")
    priced, free = f"fz-p-{tag}", f"fz-free-{tag}"
    client.upsert_product(priced, "1.5")
    client.upsert_product(free, "0")
    w = World(accounts=[plain, la], products=[priced, free])
    hold = client.reserve(plain, "1", ttl_seconds=3600)
    w.holds.append(hold.reservation_id)
    started = client.start_usage(plain, str(uuid.uuid4()), priced)
    w.learn(started)
    return w


def healthy(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


SERVED = [m for m in methods() if m.containing_service.full_name not in NOT_SERVED]


def call_and_check(
    channel: grpc.Channel, world: World, m: descriptor.MethodDescriptor, request: Any
) -> set[str]:
    """Calls, checks, and retries a mutation; answers the accounts a mutation that
    succeeded may have changed."""
    outcome = invoke(channel, m, request)
    assert_answered(m, outcome)
    for response in outcome.responses:
        world.learn(response)
    if not is_mutation(m):
        return set()
    again = invoke(channel, m, request)
    assert_answered(m, again)
    if outcome.ok:
        assert again.ok, (m.full_name, "retry", again.code, again.details)
        if m.name != "StartUsage":  # a replayed StartUsage answers the event as it is now
            assert normalised(again) == normalised(outcome), m.full_name
        return accounts_in(request, world)
    return set()


# Per RPC, so that every RPC gets its share (about 200 examples in all in CI).
EXAMPLES_PER_RPC = 6


@pytest.mark.parametrize("m", methods(), ids=lambda m: m.full_name)
@settings(max_examples=scaled(EXAMPLES_PER_RPC))
@given(data=st.data())
def test_every_rpc_with_generated_requests(
    channel: grpc.Channel, world: World, m: descriptor.MethodDescriptor, data: st.DataObject
) -> None:
    """The RPC, then (one time in two) any other RPC, with generated requests; two
    examples in three draw valid-looking requests only."""
    builder = Builder(world, data, valid=data.draw(st.integers(0, 2)) > 0)
    changed: set[str] = set()
    for call in range(data.draw(st.integers(1, 2))):
        if call:
            m = data.draw(st.sampled_from(methods()))
        request_class = message_class(m.input_type)
        if m.client_streaming:
            request: Any = [
                builder.fill(request_class()) for _ in range(data.draw(st.integers(0, 3)))
            ]
        else:
            request = builder.fill(request_class())
        changed |= call_and_check(channel, world, m, request)
    for account_id in sorted(changed):
        assert_reads_serve(channel, account_id, world)
    healthy(channel)


@pytest.mark.parametrize("m", methods(), ids=lambda m: m.full_name)
def test_every_rpc_answers_empty_and_undecodable_requests(
    channel: grpc.Channel, m: descriptor.MethodDescriptor
) -> None:
    """Every RPC, whatever the sampling above drew: the empty request, and bytes that
    are not its request message (bad UTF-8 in a string field, a corrupt wire)."""
    request_class = message_class(m.input_type)
    assert_answered(m, invoke(channel, m, [] if m.client_streaming else request_class()))
    path = f"/{m.containing_service.full_name}/{m.name}"
    for raw in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x12\x05\x0a\x03\xc3\x28\x41"):
        kwargs: dict[str, Any] = {
            "request_serializer": lambda b: b,
            "response_deserializer": lambda b: b,
        }
        try:
            if m.client_streaming:
                channel.stream_unary(path, **kwargs)(iter([raw]), timeout=20)
            elif m.server_streaming:
                list(channel.unary_stream(path, **kwargs)(raw, timeout=20))
            else:
                channel.unary_unary(path, **kwargs)(raw, timeout=20)
        except grpc.RpcError as error:
            code = error.code()
            assert code not in NEVER, (m.full_name, raw, code, error.details())
    healthy(channel)


def test_mutations_are_known() -> None:
    """The mutation rule above finds every RPC that changes state."""
    found = {m.name for m in SERVED if is_mutation(m)}
    assert {"CreateAccount", "TopUp", "RecordUsage", "StreamUsage", "CompleteUsage"} <= found
    assert not found & {"GetAccount", "ListEntries", "GetUsage", "ExportUsageReport"}
