"""Metering under concurrency across two replicas."""

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import TallyClient
from tests.conftest import ServerProcess
from tests.support import assert_consistent
from tests.test_metering import event, product


def fire(servers: tuple[ServerProcess, ServerProcess], calls: list[tuple[str, Any]]) -> list[Any]:
    """Sends (method, request) pairs at once, alternating replicas; results or RpcErrors."""

    async def main() -> list[Any]:
        channels = [grpc.aio.insecure_channel(s.target) for s in servers]
        stubs = [metering_pb2_grpc.MeteringServiceStub(c) for c in channels]
        try:
            return await asyncio.gather(
                *(
                    getattr(stubs[i % 2], method)(request, timeout=30)
                    for i, (method, request) in enumerate(calls)
                ),
                return_exceptions=True,
            )
        finally:
            for c in channels:
                await c.close()

    return asyncio.run(main())


@pytest.fixture
def replicas(
    server: ServerProcess, second_server: ServerProcess
) -> tuple[ServerProcess, ServerProcess]:
    return server, second_server


def test_same_event_from_many_callers_is_charged_once(
    client: TallyClient, funded: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    pan = product(stub, "2.95")
    e = event(funded, pan, event_id=f"dup-{uuid.uuid4()}")
    results = fire(replicas, [("RecordUsage", m.RecordUsageRequest(event=e))] * 20)
    assert all(isinstance(r, m.RecordUsageResponse) for r in results), results
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.entry.entry_id for r in results}) == 1
    assert client.get_balance(funded).balance == "97.05"
    assert_consistent(client, funded)


def test_complete_and_fail_race_exactly_one_wins(
    client: TallyClient, funded: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    job = product(stub, "1")
    jobs = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    for job_id in jobs:
        stub.StartUsage(m.StartUsageRequest(event=event(funded, job, event_id=job_id, quantity=5)))
    calls: list[tuple[str, Any]] = []
    for job_id in jobs:
        calls.append(
            (
                "CompleteUsage",
                m.CompleteUsageRequest(account_id=funded, event_id=job_id, quantity=3),
            )
        )
        calls.append(("FailUsage", m.FailUsageRequest(account_id=funded, event_id=job_id)))
    results = fire(replicas, calls)
    completed = 0
    for i in range(len(jobs)):
        pair = results[2 * i : 2 * i + 2]
        winners = [r for r in pair if not isinstance(r, BaseException)]
        losers = [r for r in pair if isinstance(r, grpc.RpcError)]
        assert len(winners) == 1 and len(losers) == 1, pair
        assert losers[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        completed += isinstance(winners[0], m.CompleteUsageResponse)
    balance = client.get_balance(funded)
    assert balance.reserved == "0"
    assert balance.balance == str(100 - 3 * completed)
    usage = stub.GetUsage(m.GetUsageRequest(account_id=funded))
    assert usage.totals.total_requests == 10
    assert usage.totals.failed_requests == 10 - completed
    assert_consistent(client, funded)


def test_starts_race_for_the_last_credits(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "10")
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    job = product(stub, "1")
    calls: list[tuple[str, Any]] = [
        ("StartUsage", m.StartUsageRequest(event=event(account_id, job, quantity=2)))
        for _ in range(12)
    ]
    results = fire(replicas, calls)
    started = [r for r in results if isinstance(r, m.StartUsageResponse)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(started) == 5 and len(refused) == 7
    assert all(r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in refused)
    assert client.get_balance(account_id).available == "0"
    assert_consistent(client, account_id)
