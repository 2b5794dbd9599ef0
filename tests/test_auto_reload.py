"""Auto-reload: fires once per crossing, caps, backoff, disabling, crash safety.

The payments backend is outside Tally, so the `grpc` funding hook is tested against
a real gRPC FundingService implemented here, on loopback.
"""

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tally.v1 import credits_pb2 as c
from tally.v1 import funding_pb2, funding_pb2_grpc
from tally_client import AsyncTallyClient, TallyClient
from tests.conftest import ServerProcess, start_server
from tests.support import assert_consistent


class PaymentsBackend(funding_pb2_grpc.FundingServiceServicer):
    """A payments backend: idempotent by key; can fail or stall on demand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.charges: dict[str, str] = {}
        self.failures_left = 0
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.stall.set()

    def Charge(
        self, request: funding_pb2.ChargeRequest, context: Any
    ) -> funding_pb2.ChargeResponse:
        self.calls.append(request.idempotency_key)
        if self.failures_left > 0:
            self.failures_left -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "card declined by the bank")
        if not self.stall.is_set():
            self.stalled.set()
            self.stall.wait(30)
        charge = self.charges.setdefault(request.idempotency_key, f"ch_{len(self.charges) + 1}")
        return funding_pb2.ChargeResponse(charge_id=charge)


@pytest.fixture
def payments() -> Iterator[tuple[PaymentsBackend, str]]:
    backend = PaymentsBackend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    funding_pb2_grpc.add_FundingServiceServicer_to_server(backend, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield backend, f"127.0.0.1:{port}"
    backend.stall.set()
    server.stop(None)


def grpc_hook_env(target: str) -> dict[str, str]:
    return {
        "TALLY_FUNDING_HOOK": "grpc",
        "TALLY_FUNDING_TARGET": target,
        "TALLY_FUNDING_TIMEOUT_SECONDS": "20",
        "TALLY_RELOAD_MAX_ATTEMPTS": "3",
        "TALLY_RELOAD_BACKOFF_SECONDS": "0.2",
        "TALLY_RELOAD_LEASE_SECONDS": "2",
    }


def set_auto_reload(client: TallyClient, account_id: str, **settings: Any) -> c.AutoReloadSettings:
    response = client.stubs.credits.SetAutoReload(
        c.SetAutoReloadRequest(
            request_id=str(uuid.uuid4()),
            account_id=account_id,
            settings=c.AutoReloadSettings(**settings),
        ),
        timeout=10,
    )
    settings_out: c.AutoReloadSettings = response.settings
    return settings_out


def reloads(client: TallyClient, account_id: str) -> list[c.ReloadIntent]:
    return list(
        client.stubs.credits.ListReloads(
            c.ListReloadsRequest(account_id=account_id), timeout=10
        ).reloads
    )


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def settled(client: TallyClient, account_id: str) -> bool:
    return all(r.status != c.RELOAD_STATUS_PENDING for r in reloads(client, account_id))


def test_crossing_fires_once_and_retries_do_not(client: TallyClient, funded: str) -> None:
    set_auto_reload(client, funded, enabled=True, threshold="50", amount="100")
    client.debit(funded, "30")
    assert reloads(client, funded) == []
    key = f"cross-{funded}"
    client.debit(funded, "30", request_id=key)  # 70 -> 40: crosses
    wait_for(lambda: client.get_balance(funded).balance == "140")
    client.debit(funded, "30", request_id=key)  # a retry: replayed, decides nothing
    (intent,) = reloads(client, funded)
    assert (intent.status, intent.amount, intent.attempts) == (c.RELOAD_STATUS_SUCCEEDED, "100", 1)
    entry = client.get_entry(intent.entry_id)
    assert (entry.description, entry.reference, entry.amount) == (
        "auto-reload",
        intent.intent_id,
        "100",
    )
    kinds = [
        g.type
        for g in client.stubs.credits.ListGrants(
            c.ListGrantsRequest(account_id=funded), timeout=10
        ).grants
    ]
    assert c.CREDIT_GRANT_TYPE_AUTO_RELOAD in kinds
    client.debit(funded, "30")  # 140 -> 110: no crossing
    assert len(reloads(client, funded)) == 1
    assert_consistent(client, funded)


def test_reserve_and_usage_cross_too(client: TallyClient, funded: str) -> None:
    set_auto_reload(client, funded, enabled=True, threshold="10", amount="5")
    client.reserve(funded, "95")  # available 100 -> 5
    wait_for(lambda: settled(client, funded) and len(reloads(client, funded)) == 1)
    assert client.get_balance(funded).available == "10"
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    client.upsert_product(product_id, "3")
    client.record_usage(funded, "e-1", product_id)  # 10 -> 7: crosses again
    wait_for(lambda: settled(client, funded) and len(reloads(client, funded)) == 2)
    assert client.get_balance(funded).available == "12"
    assert_consistent(client, funded)


def test_enabling_below_threshold_fires_and_caps_skip(client: TallyClient, funded: str) -> None:
    client.debit(funded, "95")
    settings = set_auto_reload(
        client,
        funded,
        enabled=True,
        threshold="10",
        amount="20",
        max_reloads_per_day=1,
        max_amount_per_month="1000",
    )
    assert (settings.enabled, settings.max_reloads_per_day, settings.max_amount_per_month) == (
        True,
        1,
        "1000",
    )
    wait_for(lambda: client.get_balance(funded).balance == "25")
    client.debit(funded, "20")  # 25 -> 5: crosses, but one reload a day is the cap
    intents = reloads(client, funded)
    assert [i.status for i in intents] == [c.RELOAD_STATUS_SKIPPED, c.RELOAD_STATUS_SUCCEEDED]
    assert "max_reloads_per_day" in intents[0].error
    client.debit(funded, "1")  # still below: no new decision
    assert len(reloads(client, funded)) == 2
    balance = client.get_balance(funded)
    assert balance.auto_reload.enabled and balance.auto_reload.threshold == "10"
    assert_consistent(client, funded)


def test_monthly_amount_cap(client: TallyClient, funded: str) -> None:
    set_auto_reload(
        client, funded, enabled=True, threshold="50", amount="30", max_amount_per_month="50"
    )
    client.debit(funded, "60")  # 40: reload 30 (total 30 <= 50)
    wait_for(lambda: settled(client, funded) and client.get_balance(funded).balance == "70")
    client.debit(funded, "30")  # 40: another 30 would make 60 > 50
    (skipped, done) = reloads(client, funded)
    assert skipped.status == c.RELOAD_STATUS_SKIPPED and "max_amount_per_month" in skipped.error
    assert done.status == c.RELOAD_STATUS_SUCCEEDED


def test_concurrent_crossings_fire_once(
    client: TallyClient, account_id: str, server: ServerProcess, second_server: ServerProcess
) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "60")
    # The reload (0.5) never lifts available back to the threshold, so only one
    # transaction can ever cross it, whichever replica runs it.
    set_auto_reload(client, account_id, enabled=True, threshold="50", amount="0.5")

    async def debits() -> list[Any]:
        clients = [AsyncTallyClient(s.target) for s in (server, second_server)]
        try:
            return await asyncio.gather(
                *(clients[i % 2].debit(account_id, "1") for i in range(30)), return_exceptions=True
            )
        finally:
            for x in clients:
                await x.close()

    results = asyncio.run(debits())
    assert not [r for r in results if isinstance(r, BaseException)]
    wait_for(lambda: settled(client, account_id))
    assert [r.status for r in reloads(client, account_id)] == [c.RELOAD_STATUS_SUCCEEDED]
    assert client.get_balance(account_id).balance == "30.5"
    assert_consistent(client, account_id)


def test_grpc_hook_backoff_then_turns_off(
    own_database_url: str, server_log_dir: Path, payments: tuple[PaymentsBackend, str]
) -> None:
    backend, target = payments
    backend.failures_left = 10
    replica = start_server(own_database_url, server_log_dir, grpc_hook_env(target))
    try:
        with TallyClient(replica.target) as client:
            account_id = f"fail-{uuid.uuid4().hex[:8]}"
            client.create_account(account_id)
            client.top_up(account_id, "5")
            set_auto_reload(client, account_id, enabled=True, threshold="10", amount="50")
            wait_for(lambda: settled(client, account_id))
            (intent,) = reloads(client, account_id)
            assert (intent.status, intent.attempts) == (c.RELOAD_STATUS_FAILED, 3)
            assert "declined" in intent.error
            assert backend.calls == [intent.intent_id] * 3
            settings = client.get_balance(account_id).auto_reload
            assert not settings.enabled and "3 failed funding attempts" in settings.disabled_reason
            assert client.get_balance(account_id).balance == "5"
            # Turning it back on clears the reason and decides afresh.
            backend.failures_left = 1
            set_auto_reload(client, account_id, enabled=True, threshold="10", amount="50")
            wait_for(lambda: client.get_balance(account_id).balance == "55")
            latest = reloads(client, account_id)[0]
            assert (latest.status, latest.attempts, latest.charge_id) == (
                c.RELOAD_STATUS_SUCCEEDED,
                2,
                backend.charges[latest.intent_id],
            )
            assert client.get_balance(account_id).auto_reload.disabled_reason == ""
            assert_consistent(client, account_id)
    finally:
        replica.stop()


def test_crash_between_intent_and_funding_funds_once(
    own_database_url: str, server_log_dir: Path, payments: tuple[PaymentsBackend, str]
) -> None:
    backend, target = payments
    backend.stall.clear()  # the first charge hangs, as a slow payment would
    env = grpc_hook_env(target)
    replica = start_server(own_database_url, server_log_dir, env)
    account_id = f"crash-{uuid.uuid4().hex[:8]}"
    with TallyClient(replica.target) as client:
        client.create_account(account_id)
        client.top_up(account_id, "5")
        set_auto_reload(client, account_id, enabled=True, threshold="10", amount="50")
    assert backend.stalled.wait(20)
    replica.stop(signal.SIGKILL)  # dies holding the claim, before recording anything
    backend.stall.set()
    restarted = start_server(own_database_url, server_log_dir, env)
    try:
        with TallyClient(restarted.target) as client:
            wait_for(lambda: settled(client, account_id), seconds=30)
            (intent,) = reloads(client, account_id)
            assert intent.status == c.RELOAD_STATUS_SUCCEEDED
            assert client.get_balance(account_id).balance == "55"
            credits = client.list_entries(account_id, type="credit").entries
            assert [e.description for e in credits].count("auto-reload") == 1
            # The backend saw one key, at least twice, and charged once.
            assert set(backend.calls) == {intent.intent_id} and len(backend.calls) >= 2
            assert len(backend.charges) == 1 and intent.charge_id == "ch_1"
            assert_consistent(client, account_id)
    finally:
        restarted.stop()
