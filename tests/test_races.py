"""Concurrency across two server processes sharing one database.

Every scenario fires its requests at once, split over two replicas, and then checks
exact outcomes and the invariants (VerifyAccount).
"""

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from tally.v1 import credits_pb2
from tally_client import (
    AsyncTallyClient,
    InsufficientCredits,
    ReservationNotPending,
    TallyClient,
    TallyError,
)
from tests.conftest import ServerProcess
from tests.support import assert_consistent


def run_on_both(
    servers: tuple[ServerProcess, ServerProcess],
    calls: list[Callable[[AsyncTallyClient], Awaitable[Any]]],
) -> list[Any]:
    """Runs call i on replica i % 2, all concurrently; returns results or exceptions."""

    async def main() -> list[Any]:
        clients = [AsyncTallyClient(s.target, timeout_seconds=30) for s in servers]
        try:
            return await asyncio.gather(
                *(call(clients[i % 2]) for i, call in enumerate(calls)),
                return_exceptions=True,
            )
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(main())


@pytest.fixture
def replicas(
    server: ServerProcess, second_server: ServerProcess
) -> tuple[ServerProcess, ServerProcess]:
    return server, second_server


def _unexpected(results: list[Any], *allowed: type[BaseException]) -> list[Any]:
    return [r for r in results if isinstance(r, BaseException) and not isinstance(r, allowed)]


def test_reserve_race_exactly_n_succeed(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    n, attempts = 12, 60
    client.create_account(account_id)
    client.top_up(account_id, str(n))
    results = run_on_both(
        replicas, [lambda c: c.reserve(account_id, "1", ttl_seconds=600)] * attempts
    )
    assert not _unexpected(results, InsufficientCredits)
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    assert len(succeeded) == n
    assert len({r.reservation_id for r in succeeded}) == n
    balance = client.get_balance(account_id)
    assert (balance.reserved, balance.available) == (str(n), "0")
    assert_consistent(client, account_id)


def test_debit_race_never_overdraws(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    client.create_account(account_id, overdraft_limit="2")
    client.top_up(account_id, "10.5")
    results = run_on_both(replicas, [lambda c: c.debit(account_id, "0.5")] * 50)
    assert not _unexpected(results, InsufficientCredits)
    assert sum(not isinstance(r, BaseException) for r in results) == 25  # (10.5 + 2) / 0.5
    assert client.get_balance(account_id).available == "-2"
    assert_consistent(client, account_id)


async def _reserve(c: AsyncTallyClient, account_id: str, amount: str) -> Any:
    return await c.reserve(account_id, amount, ttl_seconds=600)


async def _capture(c: AsyncTallyClient, reservation_id: str, amount: str | None) -> Any:
    return await c.capture(reservation_id, amount)


async def _release(c: AsyncTallyClient, reservation_id: str) -> Any:
    return await c.release(reservation_id)


def test_capture_and_release_of_one_hold_exactly_one_wins(
    client: TallyClient, funded: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    holds = [client.reserve(funded, "2") for _ in range(15)]
    calls: list[Callable[[AsyncTallyClient], Awaitable[Any]]] = []
    for hold in holds:
        h = hold.reservation_id
        calls += [
            functools.partial(_capture, reservation_id=h, amount="1.5"),
            functools.partial(_release, reservation_id=h),
            functools.partial(_capture, reservation_id=h, amount=None),
        ]
    results = run_on_both(replicas, calls)
    assert not _unexpected(results, ReservationNotPending)
    for i in range(len(holds)):
        winners = [r for r in results[3 * i : 3 * i + 3] if not isinstance(r, BaseException)]
        assert len(winners) == 1, results[3 * i : 3 * i + 3]
    captures = [r for r in results if isinstance(r, credits_pb2.CaptureResponse)]
    spent = sum((-Decimal(c.entry.amount) for c in captures), Decimal(0))
    entries = [e for e in client.iter_entries(funded) if e.reservation_id]
    assert sorted(e.entry_id for e in entries) == sorted(c.entry.entry_id for c in captures)
    balance = client.get_balance(funded)
    assert balance.reserved == "0"
    assert Decimal(balance.balance) == 100 - spent
    assert_consistent(client, funded)


def test_holds_over_many_accounts_at_once(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    """Reserves, then Captures and Releases, spread over accounts and fired at once on
    both replicas: each replica's groups then hold calls of many accounts, applied as one
    run (tally_hold_run). Exactly the reserves the funds allow succeed on every account,
    exactly one of each hold's Capture and Release wins, and every account's balance,
    reserved credit and ledger stay exact."""
    accounts = [f"{account_id}-{k}" for k in range(8)]
    for a in accounts:
        client.create_account(a)
        client.top_up(a, "10")
    # 7 reserves of 2 on each account, interleaved over the accounts: exactly 5 fit.
    reserves: list[Callable[[AsyncTallyClient], Awaitable[Any]]] = [
        functools.partial(_reserve, account_id=a, amount="2") for _ in range(7) for a in accounts
    ]
    results = run_on_both(replicas, reserves)
    assert not _unexpected(results, InsufficientCredits)
    holds = [r for r in results if not isinstance(r, BaseException)]
    for a in accounts:
        assert sum(h.account_id == a for h in holds) == 5, a
        assert client.get_balance(a).available == "0"
    # Each hold: a Capture and a Release at once (on different replicas): one wins.
    calls: list[Callable[[AsyncTallyClient], Awaitable[Any]]] = []
    for i, hold in enumerate(holds):
        h = hold.reservation_id
        capture = functools.partial(_capture, reservation_id=h, amount="1.5" if i % 2 else None)
        release = functools.partial(_release, reservation_id=h)
        calls += [capture, release] if i % 3 else [release, capture]
    results = run_on_both(replicas, calls)
    assert not _unexpected(results, ReservationNotPending)
    for i in range(len(holds)):
        assert sum(not isinstance(r, BaseException) for r in results[2 * i : 2 * i + 2]) == 1
    captures = [r for r in results if isinstance(r, credits_pb2.CaptureResponse)]
    for a in accounts:
        spent = sum(
            (-Decimal(c.entry.amount) for c in captures if c.entry.account_id == a), Decimal(0)
        )
        balance = client.get_balance(a)
        assert balance.reserved == "0"
        assert Decimal(balance.balance) == 10 - spent
        assert_consistent(client, a)


def test_same_request_id_on_both_replicas_applies_once(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    client.create_account(account_id)
    key = f"topup-{uuid.uuid4()}"
    results = run_on_both(replicas, [lambda c: c.top_up(account_id, "7", request_id=key)] * 20)
    assert not _unexpected(results)
    assert len({r.SerializeToString() for r in results}) == 1
    assert client.get_balance(account_id).balance == "7"
    hold_key = f"hold-{uuid.uuid4()}"
    holds = run_on_both(replicas, [lambda c: c.reserve(account_id, "1", request_id=hold_key)] * 20)
    assert not _unexpected(holds)
    assert len({h.reservation_id for h in holds}) == 1
    assert client.get_balance(account_id).reserved == "1"
    assert_consistent(client, account_id)


def test_same_request_id_create_account_race(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    key = f"create-{uuid.uuid4()}"
    results = run_on_both(replicas, [lambda c: c.create_account(account_id, request_id=key)] * 10)
    assert not _unexpected(results)
    assert len({r.SerializeToString() for r in results}) == 1


def test_mixed_traffic_keeps_the_ledger_exact(
    client: TallyClient, account_id: str, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "1000")
    calls: list[Callable[[AsyncTallyClient], Awaitable[Any]]] = []
    for i in range(60):
        if i % 3 == 0:
            calls.append(lambda c: c.top_up(account_id, "0.000001"))
        elif i % 3 == 1:
            calls.append(lambda c: c.debit(account_id, "0.333333"))
        else:

            async def reserve_capture(c: AsyncTallyClient) -> Any:
                hold = await c.reserve(account_id, "1")
                return await c.capture(hold.reservation_id, "0.1")

            calls.append(reserve_capture)
    results = run_on_both(replicas, calls)
    failures = [r for r in results if isinstance(r, TallyError | BaseException)]
    assert not failures
    # 1000 + 20 * 0.000001 - 20 * 0.333333 - 20 * 0.1, exactly
    assert client.get_balance(account_id).balance == "991.33336"
    assert_consistent(client, account_id)
