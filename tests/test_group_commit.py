"""Group commit: concurrent movements share one transaction, and each keeps its own
outcome (DESIGN.md 7, 8, 9)."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from tally_client import (
    AsyncTallyClient,
    InsufficientCredits,
    NotFound,
    RequestIdReused,
    TallyClient,
    TallyError,
)
from tests.conftest import start_server
from tests.support import assert_consistent


async def _transactions(url: str, request_ids: list[str]) -> int:
    """How many transactions wrote the ledger entries of these requests (rows written by
    one transaction share its xmin)."""
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM ledger_entries WHERE request_id = ANY($1)",
            request_ids,
        )
        return value
    finally:
        await conn.close()


def test_each_call_in_a_group_keeps_its_own_outcome(
    own_database_url: str, server_log_dir: Path
) -> None:
    # A long wait makes every call below land in one group.
    replica = start_server(
        own_database_url,
        server_log_dir,
        {"TALLY_GROUP_MAX_WAIT_MS": "1000", "TALLY_GROUP_CONCURRENCY": "1"},
    )
    try:
        with TallyClient(replica.target) as client:
            client.create_account("hot")
            client.top_up("hot", "10", request_id="seed")
            hold = client.reserve("hot", "1")

        async def main() -> list[Any]:
            async with AsyncTallyClient(replica.target, timeout_seconds=10) as c:
                calls = [
                    c.debit("hot", "3", request_id="d1"),
                    c.debit("hot", "100", request_id="too-much"),  # refused alone
                    c.debit("hot", "3", request_id="d2"),
                    c.debit("nobody", "1", request_id="unknown-account"),
                    c.top_up("hot", "5", request_id="seed"),  # the key is another payload's
                    c.debit("hot", "3", request_id="d1"),  # a retry inside the same group
                    c.capture(hold.reservation_id, "1", request_id="cap"),
                    c.release(hold.reservation_id, request_id="rel"),  # after the capture
                    c.adjust("hot", "-0.5", reason="fix", request_id="adj"),
                ]
                return list(await asyncio.gather(*calls, return_exceptions=True))

        results = asyncio.run(main())
        d1, too_much, d2, unknown, reused, d1_again, capture, release, adjust = results
        assert isinstance(too_much, InsufficientCredits)
        assert isinstance(unknown, NotFound)
        assert isinstance(reused, RequestIdReused)
        # Capture and release race inside the group: exactly one wins.
        finished = [r for r in (capture, release) if not isinstance(r, BaseException)]
        refused = [r for r in (capture, release) if isinstance(r, TallyError)]
        assert len(finished) == 1 and len(refused) == 1
        assert refused[0].reason == "RESERVATION_NOT_PENDING"
        captured = not isinstance(capture, BaseException)
        assert d1_again.entry_id == d1.entry_id
        assert not isinstance(d2, BaseException)
        assert not isinstance(adjust, BaseException)
        # The movements that wrote entries were committed together, in one transaction.
        written = ["d1", "d2", "adj", *(["cap"] if captured else [])]
        assert asyncio.run(_transactions(own_database_url, written)) == 1
        with TallyClient(replica.target) as client:
            balance = client.get_balance("hot")
            assert balance.balance == ("2.5" if captured else "3.5")  # 10 - 3 - 3 (- 1) - 0.5
            assert balance.reserved == "0"
            assert_consistent(client, "hot")
    finally:
        replica.stop()


def test_a_failed_group_fails_only_its_calls_retryably(
    own_database_url: str, server_log_dir: Path
) -> None:
    """The statement timeout cancels the whole group: every call in it is UNAVAILABLE,
    nothing is written, and the retries with the same keys do the work once."""
    replica = start_server(
        own_database_url,
        server_log_dir,
        {
            "TALLY_GROUP_MAX_WAIT_MS": "1000",
            "TALLY_GROUP_CONCURRENCY": "1",
            "TALLY_DB_STATEMENT_TIMEOUT_MS": "500",
        },
    )
    try:
        with TallyClient(replica.target) as client:
            client.create_account("locked")
            client.create_account("free")
            client.top_up("locked", "10")
            client.top_up("free", "10")

        async def main() -> list[Any]:
            conn = await asyncpg.connect(own_database_url)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT 1 FROM accounts WHERE account_id = 'locked' FOR UPDATE"
                    )
                    async with AsyncTallyClient(
                        replica.target, timeout_seconds=10, max_attempts=1
                    ) as c:
                        return list(
                            await asyncio.gather(
                                c.debit("locked", "1", request_id="g-locked"),
                                c.debit("free", "1", request_id="g-free"),
                                return_exceptions=True,
                            )
                        )
            finally:
                await conn.close()

        results = asyncio.run(main())
        for r in results:
            assert isinstance(r, TallyError), r
            assert r.code == grpc.StatusCode.UNAVAILABLE
        with TallyClient(replica.target) as client:
            assert client.get_balance("free").balance == "10"  # nothing half-written
            assert client.debit("free", "1", request_id="g-free").balance_after == "9"
            assert client.debit("locked", "1", request_id="g-locked").balance_after == "9"
            assert_consistent(client, "free")
            assert_consistent(client, "locked")
    finally:
        replica.stop()


def test_hot_account_under_many_callers_matches_the_ledger(
    own_database_url: str, server_log_dir: Path
) -> None:
    """Many concurrent debits on one account with grouping on: exactly the affordable
    ones succeed, whatever the grouping, and the ledger chain stays exact."""
    replica = start_server(own_database_url, server_log_dir)
    try:
        with TallyClient(replica.target) as client:
            client.create_account("hot2")
            client.top_up("hot2", "50")

        async def main() -> list[Any]:
            async with AsyncTallyClient(replica.target, timeout_seconds=30) as c:
                return await asyncio.gather(
                    *(c.debit("hot2", "1", request_id=uuid.uuid4().hex) for _ in range(80)),
                    return_exceptions=True,
                )

        results = asyncio.run(main())
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, InsufficientCredits)]
        assert len(ok) == 50 and len(refused) == 30
        assert sorted(r.balance_after for r in ok) == sorted(str(i) for i in range(50))
        with TallyClient(replica.target) as client:
            assert_consistent(client, "hot2")
    finally:
        replica.stop()


def test_unary_usage_calls_share_one_transaction(
    own_database_url: str, server_log_dir: Path
) -> None:
    """Concurrent RecordUsage calls of one event each are recorded by one call of the
    set-based function; each keeps its own answer (a duplicate event id waits for the
    next group, an unknown product is refused alone)."""
    replica = start_server(
        own_database_url,
        server_log_dir,
        {"TALLY_GROUP_MAX_WAIT_MS": "1000", "TALLY_GROUP_CONCURRENCY": "1"},
    )
    try:
        with TallyClient(replica.target) as client:
            client.create_account("meter")
            client.top_up("meter", "10")
            client.upsert_product("ocr", "0.5")

        async def main() -> list[Any]:
            async with AsyncTallyClient(replica.target, timeout_seconds=10) as c:
                calls = [c.record_usage("meter", f"e{i}", "ocr", quantity=1) for i in range(6)]
                calls.append(c.record_usage("meter", "e0", "ocr", quantity=1))  # the same again
                calls.append(c.record_usage("meter", "e-bad", "no-such-product", quantity=1))
                return list(await asyncio.gather(*calls, return_exceptions=True))

        results = asyncio.run(main())
        written, again, bad = results[:6], results[6], results[7]
        for r in written:
            assert not isinstance(r, BaseException), r
        assert not isinstance(again, BaseException), again
        assert again.event.event_id == "e0"
        assert [r.duplicate for r in (written[0], again)].count(True) == 1
        assert isinstance(bad, NotFound)
        events = [f"e{i}" for i in range(6)]
        charged = [r.entry.request_id for r in [*written, again] if not r.duplicate]
        assert len(charged) == 6
        # Six entries, at most two transactions (the duplicate waits for the next group).
        assert asyncio.run(_transactions(own_database_url, charged)) <= 2
        with TallyClient(replica.target) as client:
            assert client.get_balance("meter").balance == "7"  # 10 - 6 x 0.5
            assert_consistent(client, "meter")
        assert sorted(e for e in events) == sorted({r.event.event_id for r in written})
    finally:
        replica.stop()
