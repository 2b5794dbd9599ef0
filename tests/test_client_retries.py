"""Retries by the gRPC service config shipped with the protos (tally/v1/service_config.json),
against the real server behind a proxy that drops the first connections."""

import asyncio
import json
import uuid

import grpc
import pytest
from google.protobuf import descriptor

from tally.v1 import accounts_pb2, credits_pb2, funding_pb2, ledger_pb2, metering_pb2
from tally_client import (
    AsyncTallyClient,
    TallyClient,
    Unavailable,
    service_config,
    service_config_json,
)
from tests.conftest import ROOT, ServerProcess
from tests.support import FAST_RECONNECT, DroppingProxy


def _services() -> list[descriptor.ServiceDescriptor]:
    files = (accounts_pb2, credits_pb2, funding_pb2, ledger_pb2, metering_pb2)
    return [s for f in files for s in f.DESCRIPTOR.services_by_name.values()]


def test_every_service_has_the_retry_policy() -> None:
    shipped = json.loads((ROOT / "protos" / "tally" / "v1" / "service_config.json").read_text())
    assert service_config() == shipped  # the package data is the file next to the protos
    (policy_config, stream_config) = shipped["methodConfig"]
    named = {n["service"] for n in policy_config["name"] if "method" not in n}
    assert named == {s.full_name for s in _services()}
    policy = policy_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= policy["maxAttempts"] <= 5
    # StreamUsage: no policy of gRPC's (the client retries a Sequence of events itself).
    assert stream_config == {
        "name": [{"service": "tally.v1.MeteringService", "method": "StreamUsage"}]
    }
    assert (
        "StreamUsage" in metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].methods_by_name
    )

    assert service_config(3)["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 3
    assert service_config(9)["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "retryPolicy" not in service_config(1)["methodConfig"][0]


def test_grpc_retries_a_unary_call(server: ServerProcess, account_id: str) -> None:
    proxy = DroppingProxy(server.target, drops=2)
    try:
        with TallyClient(proxy.target, max_attempts=4, options=FAST_RECONNECT) as c:
            c.create_account(account_id)
            c.top_up(account_id, "3", request_id=f"retried-{account_id}")
            assert c.get_balance(account_id).balance == "3"
        assert proxy.accepted >= 3
    finally:
        proxy.close()

    # The client's own loop does not retry UNAVAILABLE on a channel it made: without gRPC's
    # retries (turned off here), the first dropped connection is the answer.
    proxy = DroppingProxy(server.target, drops=1)
    try:
        options = [*FAST_RECONNECT, ("grpc.enable_retries", 0)]
        with (
            TallyClient(proxy.target, max_attempts=4, options=options) as c,
            pytest.raises(Unavailable),
        ):
            c.get_balance(account_id)
        # max_attempts=1: no retry policy at all.
        proxy.drops = proxy.accepted + 1
        with (
            TallyClient(proxy.target, max_attempts=1, options=FAST_RECONNECT) as c,
            pytest.raises(Unavailable),
        ):
            c.get_balance(account_id)
    finally:
        proxy.close()


def test_async_client_and_own_channel(server: ServerProcess, account_id: str) -> None:
    async def run() -> None:
        proxy = DroppingProxy(server.target, drops=1)
        try:
            async with AsyncTallyClient(proxy.target, options=FAST_RECONNECT) as c:
                await c.create_account(account_id)
                assert (await c.get_balance(account_id)).balance == "0"
        finally:
            proxy.close()

    asyncio.run(run())

    # A channel of the caller's own, with the shipped service config.
    proxy = DroppingProxy(server.target, drops=1)
    try:
        options = [*FAST_RECONNECT, ("grpc.service_config", service_config_json())]
        with (
            grpc.insecure_channel(proxy.target, options=options) as channel,
            TallyClient(channel=channel, max_attempts=1) as c,
        ):
            key = f"own-{uuid.uuid4()}"
            assert c.top_up(account_id, "1", request_id=key).balance_after == "1"
            assert c.top_up(account_id, "1", request_id=key).balance_after == "1"  # replayed
    finally:
        proxy.close()
