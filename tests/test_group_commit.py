"""Group commit: concurrent movements share one transaction, and each keeps its own
outcome (DESIGN.md 7, 8, 9)."""

import asyncio
import json
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
from tally_service import metrics
from tally_service.db import Database, GroupSettings, make_engine
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


# Micro-credits.
_C = 1_000_000


async def _grants_and_account(conn: Any, acct: str) -> tuple[list[Any], Any]:
    """An account's grants in draw order and its row, as the set-vs-one-by-one tests
    compare them."""
    grants = await conn.fetch(
        "SELECT grant_type, amount, remaining FROM grants WHERE account_id = $1 "
        "ORDER BY priority, created_at",
        acct,
    )
    account = await conn.fetchrow(
        "SELECT balance, reserved, last_sequence FROM accounts WHERE account_id = $1", acct
    )
    return list(grants), account


async def _debit_run_vs_one_by_one(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:

        async def move(rid: str, account: str, kind: str, amount: int, grant: str | None) -> Any:
            return await conn.fetchval(
                "SELECT tally_move($1, '\\x00', $2, $3, $4, $5, '', '', '{}', $6::jsonb)",
                rid,
                "Debit" if kind == "debit" else "TopUp",
                account,
                kind,
                amount,
                grant,
            )

        for acct in ("set-a", "set-b", "seq-a", "seq-b", "set-lone", "seq-lone"):
            await conn.fetchval(
                "SELECT tally_create_account($1, '\\x00', $2, '', '', 'UTC', 'CREDIT', $3, NULL)",
                f"create-{acct}",
                acct,
                5 * _C,
            )
            await move(f"{acct}-top", acct, "credit", 3 * _C, '{"type": "purchased"}')
            await move(f"{acct}-adj", acct, "adjustment", 2 * _C, None)
            await conn.fetchval(
                "SELECT tally_reserve($1, '\\x00', $2, $3, 3600, '', '{}')",
                f"{acct}-hold",
                acct,
                _C,
            )
            await conn.fetchval(
                "SELECT tally_set_auto_reload($1, '\\x00', $2, true, $3, $4, 0, 0)",
                f"{acct}-reload",
                acct,
                2 * _C,
                10 * _C,
            )
            await move(f"{acct}-old", acct, "debit", -_C // 10, None)
        # (key suffix, amount, fingerprint, caller): refusals in the middle of the run.
        plan = [
            ("d1", 3 * _C // 2, "00", "alice"),
            ("big", 100 * _C, "00", "bob"),
            ("d2", 2 * _C, "00", ""),
            ("old", _C // 10, "00", "alice"),  # a replay of an earlier debit
            ("top", _C, "01", "bob"),  # a key of another payload: refused
            ("d3", _C, "00", "alice"),
            ("d4", 5 * _C // 2, "00", "bob"),  # into the overdraft
            ("d5", 3 * _C, "00", "alice"),  # past the overdraft: refused
            ("d6", _C // 2, "00", "bob"),
        ]

        def args(acct: str, key: str, amount: int, fp: str) -> dict[str, Any]:
            return {
                "request_id": f"{acct}-{key}",
                "fingerprint": fp,
                "method": "TopUp" if key == "top" else "Debit",
                "account_id": acct,
                "type": "debit",
                "amount": -amount,
                "description": key,
                "reference": "",
                "metadata": '{"k": 1}',
                "grant": None,
            }

        # Two accounts' runs interleaved, an account with one debit, an unknown account.
        calls: list[dict[str, Any]] = [
            {"f": "tally_move", "caller": caller, "a": args(f"set-{x}", key, amount, fp)}
            for key, amount, fp, caller in plan
            for x in ("a", "b")
        ]
        calls.insert(3, {"f": "tally_move", "caller": "", "a": args("set-lone", "d1", _C, "00")})
        calls.insert(7, {"f": "tally_move", "caller": "", "a": args("nobody", "d1", _C, "00")})
        grouped = json.loads(
            await conn.fetchval("SELECT tally_apply_group($1::jsonb)::text", json.dumps(calls))
        )
        alone = []
        for call in calls:
            a: dict[str, Any] = dict(call["a"])
            a["account_id"] = a["account_id"].replace("set", "seq")
            a["request_id"] = a["request_id"].replace("set", "seq")
            caller, key, fp = call["caller"], a["description"], a["fingerprint"]
            async with conn.transaction():
                await conn.execute("SELECT set_config('tally.caller', $1, true)", caller)
                alone.append(
                    json.loads(
                        await conn.fetchval(
                            "SELECT tally_move($1, decode($2, 'hex'), $3, $4, $5, $6, $7, "
                            "$8, $9::jsonb, NULL)::text",
                            a["request_id"],
                            fp,
                            a["method"],
                            a["account_id"],
                            "debit",
                            a["amount"],
                            key,
                            "",
                            a["metadata"],
                        )
                    )
                )

        def same(value: Any) -> Any:
            text = json.dumps(value, sort_keys=True).replace('"set', '"seq')
            scrubbed = json.loads(text)
            entry = (scrubbed.get("response") or {}).get("entry")
            if entry:
                for volatile in ("entry_id", "created_at"):
                    entry.pop(volatile)
            return scrubbed

        assert [same(r) for r in grouped] == [same(r) for r in alone]
        refused = [False, True, False, False, True, False, False, True, False]
        expected = [r for r in refused for _ in ("a", "b")]
        expected.insert(3, False)
        expected.insert(7, True)
        assert [("error" in r) for r in grouped] == expected
        assert grouped[8]["replayed"] is True and grouped[9]["replayed"] is True

        async def state(acct: str) -> Any:
            entries = await conn.fetch(
                "SELECT sequence, entry_type, amount, balance_after, description, metadata, "
                "credit_type FROM ledger_entries WHERE account_id = $1 ORDER BY sequence",
                acct,
            )
            grants, account = await _grants_and_account(conn, acct)
            reloads = await conn.fetchval(
                "SELECT count(*) FROM reload_intents WHERE account_id = $1", acct
            )
            return [dict(r) for r in entries], [dict(r) for r in grants], dict(account), reloads

        for x in ("a", "b", "lone"):
            set_state, seq_state = await state(f"set-{x}"), await state(f"seq-{x}")
            assert set_state == seq_state
            if x != "lone":
                assert set_state[3] == 1  # the reload rule crossed once
                assert {e["credit_type"] for e in set_state[0]} >= {
                    "promotional",
                    "purchased",
                    None,
                }
        # The run was applied as a set: its entries share one instant and one transaction.
        stamps = await conn.fetchval(
            "SELECT count(DISTINCT (created_at, xmin::text)) FROM ledger_entries "
            "WHERE request_id LIKE 'set-%-d%'"
        )
        assert stamps == 1
    finally:
        await conn.close()


def test_a_run_of_debits_as_a_set_equals_one_by_one(own_database_url: str) -> None:
    """tally_debit_run gives each debit of a group the outcome, entry, draw and reload
    decision it would have alone, in order."""
    asyncio.run(_debit_run_vs_one_by_one(own_database_url))


def test_each_caller_of_a_group_notes_its_own_answer(own_database_url: str) -> None:
    """Metrics learn whether an answer is a replay from Database.call, in the caller's
    own context: in a group, a replayed item marks its own RPC only, not the RPC whose
    call started the group's task (whose context that task copied)."""

    def move(request_id: str, amount: int) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "fingerprint": request_id.encode().ljust(32, b"\0"),
            "method": "TopUp",
            "account_id": "notes",
            "type": "credit",
            "amount": amount,
            "description": "",
            "reference": "",
            "metadata": "{}",
            "grant": None,
        }

    async def main() -> list[tuple[bool, bool]]:
        db = Database(
            make_engine(own_database_url, pool_size=2),
            GroupSettings(max_items=64, max_wait_seconds=0.3, concurrency=1),
        )
        try:
            await db.call(
                "tally_create_account",
                {
                    "request_id": "create-notes",
                    "fingerprint": b"c" * 32,
                    "account_id": "notes",
                    "email": "",
                    "name": "",
                    "time_zone": "UTC",
                    "currency": "CREDIT",
                    "overdraft_limit": 0,
                    "trial_ends_at": None,
                },
            )
            await db.call("tally_move", move("first", 1_000_000))

            async def rpc(request_id: str) -> tuple[bool, bool]:
                notes = metrics.RpcNotes()
                metrics._current.set(notes)  # what MetricsInterceptor does per RPC
                _, replayed = await db.call("tally_move", move(request_id, 1_000_000))
                return notes.replayed, replayed

            # One group (the wait gathers them): a new movement starts the group's task,
            # then a replay of "first", then another new movement.
            return list(
                await asyncio.gather(
                    asyncio.create_task(rpc("new-1")),
                    asyncio.create_task(rpc("first")),
                    asyncio.create_task(rpc("new-2")),
                )
            )
        finally:
            await db.engine.dispose()

    assert asyncio.run(main()) == [(False, False), (True, True), (False, False)]


async def _hold_run_vs_one_by_one(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:

        async def call(caller: str, statement: str, *args: Any) -> Any:
            async with conn.transaction():
                await conn.execute("SELECT set_config('tally.caller', $1, true)", caller)
                return json.loads(await conn.fetchval(statement, *args))

        reserve_sql = "SELECT tally_reserve($1, decode($2, 'hex'), $3, $4, $5, $6, $7::jsonb)::text"
        held: dict[str, dict[str, str]] = {}
        await conn.fetchval(
            "SELECT tally_upsert_product('product', '\\x00', 'hold-run', '', 1000, false, 0)"
        )
        for acct in ("set", "set2", "seq"):
            await conn.fetchval(
                "SELECT tally_create_account($1, '\\x00', $2, '', '', 'UTC', 'CREDIT', $3, NULL)",
                f"create-{acct}",
                acct,
                _C,
            )
            await conn.fetchval(
                "SELECT tally_move($1, '\\x00', 'TopUp', $2, 'credit', $3, '', '', '{}', "
                '\'{"type": "purchased"}\')',
                f"{acct}-top",
                acct,
                9 * _C // 2,
            )
            await conn.fetchval(
                "SELECT tally_move($1, '\\x00', 'Adjust', $2, 'adjustment', $3, '', '', '{}', "
                "NULL)",
                f"{acct}-adj",
                acct,
                _C // 2,  # the first capture spans both grants
            )
            held[acct] = {}
            holds = (("h1", _C), ("h2", 2 * _C), ("h3", _C), ("old", _C // 2), ("job", 1000))
            for name, amount in holds:
                answer = await call(
                    "", reserve_sql, f"{acct}-{name}", "00", acct, amount, 3600, name, '{"h": 1}'
                )
                held[acct][name] = answer["response"]["reservation"]["reservation_id"]
            # An open usage job on the hold "job": Capture and Release leave it alone.
            await conn.execute(
                "INSERT INTO usage_events (account_id, event_id, product_id, status, success, "
                "quantity, started_at, reservation_id, fingerprint) "
                "VALUES ($1, 'job', 'hold-run', 'pending', false, 1, now(), $2::uuid, '\\x00')",
                acct,
                held[acct]["job"],
            )
        # (function, key, hold or amount, fingerprint, caller, extra): refusals in the middle.
        plan: list[tuple[str, str, Any, str, str, Any]] = [
            ("tally_reserve", "r1", _C, "00", "alice", 600),
            ("tally_capture", "c1", "h1", "00", "bob", None),  # the whole hold
            ("tally_reserve", "big", 100 * _C, "00", "", 600),  # insufficient
            ("tally_capture", "c2", "h2", "00", "alice", _C // 2),  # part of the hold
            ("tally_release", "rel2", "h2", "00", "bob", None),  # captured just before
            ("tally_reserve", "old", _C // 2, "00", "alice", 3600),  # a replay
            ("tally_capture", "top", "h3", "01", "bob", None),  # another request's key
            ("tally_capture", "c3", "h3", "00", "", 5 * _C),  # more than held
            ("tally_release", "rel3", "h3", "00", "alice", None),
            ("tally_reserve", "r2", 3 * _C // 2, "00", "bob", 60),  # into the overdraft
            ("tally_capture", "c4", "h1", "00", "alice", None),  # captured already
            ("tally_reserve", "r3", 2 * _C, "00", "", 60),  # past the overdraft
            ("tally_capture", "c5", "job", "00", "bob", None),  # an open usage job's
            ("tally_release", "rel5", "job", "00", "", None),
        ]

        def args(acct: str, f: str, key: str, target: Any, fp: str, extra: Any) -> dict[str, Any]:
            common = {"request_id": f"{acct}-{key}", "fingerprint": fp}
            if f == "tally_reserve":
                return common | {
                    "account_id": acct,
                    "amount": target,
                    "ttl_seconds": extra,
                    "reference": key,
                    "metadata": '{"h": 1}' if key == "old" else '{"r": 1}',
                }
            common["reservation_id"] = held[acct][target]
            if f == "tally_capture":
                return common | {"amount": extra, "description": key, "metadata": '{"c": 1}'}
            return common

        # Two accounts' runs interleaved in one group (one run over both), then a Reserve
        # of an account that does not exist (one by one).
        calls = [
            {"f": f, "caller": caller, "a": args(acct, f, key, target, fp, extra)}
            for f, key, target, fp, caller, extra in plan
            for acct in ("set", "set2")
        ]
        unknown: dict[str, Any] = {"request_id": "nobody-r", "fingerprint": "00"}
        unknown |= {"account_id": "nobody", "amount": 1, "ttl_seconds": 60}
        unknown |= {"reference": "", "metadata": "{}"}
        calls.append({"f": "tally_reserve", "caller": "", "a": unknown})
        both = json.loads(
            await conn.fetchval("SELECT tally_apply_group($1::jsonb)::text", json.dumps(calls))
        )
        assert both[-1]["error"]["sqlstate"] == "TA404"
        grouped, grouped2 = both[0:-1:2], both[1:-1:2]
        alone = []
        for f, key, target, fp, caller, extra in plan:
            a = args("seq", f, key, target, fp, extra)
            if f == "tally_reserve":
                alone.append(
                    await call(
                        caller,
                        reserve_sql,
                        a["request_id"],
                        fp,
                        "seq",
                        a["amount"],
                        a["ttl_seconds"],
                        a["reference"],
                        a["metadata"],
                    )
                )
            elif f == "tally_capture":
                alone.append(
                    await call(
                        caller,
                        "SELECT tally_capture($1, decode($2, 'hex'), $3::uuid, $4, $5, "
                        "$6::jsonb)::text",
                        a["request_id"],
                        fp,
                        a["reservation_id"],
                        a["amount"],
                        a["description"],
                        a["metadata"],
                    )
                )
            else:
                alone.append(
                    await call(
                        caller,
                        "SELECT tally_release($1, decode($2, 'hex'), $3::uuid)::text",
                        a["request_id"],
                        fp,
                        a["reservation_id"],
                    )
                )

        ids = {v: k for acct in held for k, v in held[acct].items()}

        def same(value: Any) -> Any:
            text = json.dumps(value, sort_keys=True).replace('"set2', '"seq')
            text = text.replace('"set', '"seq')
            for rid, name in ids.items():
                text = text.replace(rid, name)
            scrubbed = json.loads(text)
            response = scrubbed.get("response") or {}
            for part, volatile in (
                ("entry", ("entry_id", "created_at")),
                ("reservation", ("created_at", "expires_at", "finalized_at")),
            ):
                row = response.get(part)
                if row:
                    for column in volatile:
                        row.pop(column)
                    if part == "reservation" and "-" in row["reservation_id"]:
                        row.pop("reservation_id")  # a hold placed by this plan
            if "reservation" in response and "entry" in response:
                response["entry"].pop("reservation_id")
            return scrubbed

        assert [same(r) for r in grouped] == [same(r) for r in alone]
        assert [same(r) for r in grouped2] == [same(r) for r in alone]
        assert [("error" in r) for r in grouped] == [
            False,
            False,
            True,
            False,
            True,
            False,
            True,
            True,
            False,
            False,
            True,
            True,
            True,
            True,
        ]
        assert grouped[5]["replayed"] is True
        assert [r["error"]["sqlstate"] for r in grouped if "error" in r] == [
            "TA402",
            "TA412",
            "TA409",
            "TA422",
            "TA412",
            "TA402",
            "TA423",
            "TA423",
        ]

        async def state(acct: str) -> Any:
            entries = await conn.fetch(
                "SELECT e.sequence, e.entry_type, e.amount, e.balance_after, e.description, "
                "e.reference, e.metadata, e.credit_type, e.request_id, h.request_id AS hold "
                "FROM ledger_entries e LEFT JOIN holds h USING (reservation_id) "
                "WHERE e.account_id = $1 ORDER BY e.sequence",
                acct,
            )
            holds = await conn.fetch(
                "SELECT request_id, status, amount, captured, reference, metadata, "
                "round(extract(epoch FROM expires_at - created_at)) AS ttl, "
                "finalized_at IS NULL AS open "
                "FROM holds WHERE account_id = $1 ORDER BY request_id",
                acct,
            )
            grants, account = await _grants_and_account(conn, acct)
            keys = await conn.fetch(
                "SELECT request_id, method FROM idempotency_keys WHERE request_id LIKE $1 "
                "ORDER BY request_id",
                f"{acct}-%",
            )
            rows = [
                [{k: str(v).replace(acct, "acct") for k, v in dict(r).items()} for r in part]
                for part in (entries, holds, grants, keys)
            ]
            return [*rows, dict(account)]

        set_state, seq_state = await state("set"), await state("seq")
        assert set_state == seq_state
        assert await state("set2") == seq_state
        assert {e["credit_type"] for e in set_state[0]} >= {"promotional", "purchased"}
        # The run was applied as a set: its holds and entries share one instant.
        stamps = await conn.fetchval(
            "SELECT count(DISTINCT at) FROM ("
            "SELECT created_at AS at FROM ledger_entries WHERE request_id LIKE 'set-c%' "
            "UNION ALL SELECT created_at FROM holds WHERE request_id IN ('set-r1', 'set-r2') "
            "UNION ALL SELECT finalized_at FROM holds WHERE request_id IN ('set-h1', 'set-h3')"
            ") t"
        )
        assert stamps == 1
    finally:
        await conn.close()


def test_a_run_of_hold_calls_as_a_set_equals_one_by_one(own_database_url: str) -> None:
    """tally_hold_run gives each Reserve, Capture and Release of a group the outcome,
    hold, entry and draw it would have alone, in order, over two accounts at once."""
    asyncio.run(_hold_run_vs_one_by_one(own_database_url))


async def _alerting_and_reloading_single_calls(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:

        async def state(acct: str) -> Any:
            entries = await conn.fetch(
                "SELECT sequence, entry_type, amount, balance_after, credit_type, request_id "
                "FROM ledger_entries WHERE account_id = $1 ORDER BY sequence",
                acct,
            )
            holds = await conn.fetch(
                "SELECT request_id, status, amount, captured FROM holds WHERE account_id = $1 "
                "ORDER BY request_id",
                acct,
            )
            notes = await conn.fetch(
                "SELECT metric, observed, fire_at FROM notifications WHERE account_id = $1 "
                "ORDER BY crossed_at",
                acct,
            )
            reloads = await conn.fetch(
                "SELECT status, amount FROM reload_intents WHERE account_id = $1 "
                "ORDER BY created_at",
                acct,
            )
            account = await conn.fetchrow(
                "SELECT balance, reserved, last_sequence FROM accounts WHERE account_id = $1",
                acct,
            )
            rows = [
                [{k: str(v).replace(acct, "acct") for k, v in dict(r).items()} for r in part]
                for part in (entries, holds, notes, reloads)
            ]
            return [*rows, dict(account)]

        # alert: a threshold on available credit; reload: auto-reload on; both are
        # crossed by their one call. two: alerts too, but two calls (one by one).
        kinds = ("alert", "reload", "two", "plain", "debit-alert", "debit-plain")
        for side in ("set", "seq"):
            for kind in kinds:
                acct = f"{side}-{kind}"
                await conn.fetchval(
                    "SELECT tally_create_account($1, '\\x00', $2, '', '', 'UTC', 'CREDIT', 0, "
                    "NULL)",
                    f"create-{acct}",
                    acct,
                )
                await conn.fetchval(
                    "SELECT tally_move($1, '\\x00', 'TopUp', $2, 'credit', $3, '', '', '{}', "
                    '\'{"type": "purchased"}\')',
                    f"{acct}-top",
                    acct,
                    10 * _C,
                )
                if kind in ("alert", "two", "debit-alert"):
                    await conn.fetchval(
                        "SELECT tally_create_threshold($1, '\\x00', $2, 'available_credit', "
                        "$3, 100, NULL)",
                        f"{acct}-threshold",
                        acct,
                        5 * _C,
                    )
                if kind == "reload":
                    await conn.fetchval(
                        "SELECT tally_set_auto_reload($1, '\\x00', $2, true, $3, $4, 0, 0)",
                        f"{acct}-auto",
                        acct,
                        5 * _C,
                        10 * _C,
                    )

        def calls(side: str) -> list[dict[str, Any]]:
            def reserve(kind: str, key: str, amount: int) -> dict[str, Any]:
                acct = f"{side}-{kind}"
                return {
                    "f": "tally_reserve",
                    "caller": "alice",
                    "a": {
                        "request_id": f"{acct}-{key}",
                        "fingerprint": "00",
                        "account_id": acct,
                        "amount": amount,
                        "ttl_seconds": 600,
                        "reference": key,
                        "metadata": "{}",
                    },
                }

            def debit(kind: str, amount: int) -> dict[str, Any]:
                acct = f"{side}-{kind}"
                return {
                    "f": "tally_move",
                    "caller": "bob",
                    "a": {
                        "request_id": f"{acct}-d",
                        "fingerprint": "00",
                        "method": "Debit",
                        "account_id": acct,
                        "type": "debit",
                        "amount": -amount,
                        "description": "",
                        "reference": "",
                        "metadata": "{}",
                        "grant": None,
                    },
                }

            return [
                reserve("alert", "r", 6 * _C),
                debit("debit-alert", 6 * _C),
                reserve("reload", "r", 6 * _C),
                reserve("two", "r1", 3 * _C),
                debit("debit-plain", 6 * _C),
                reserve("plain", "r", 6 * _C),
                reserve("two", "r2", 3 * _C),
            ]

        grouped = json.loads(
            await conn.fetchval(
                "SELECT tally_apply_group($1::jsonb)::text", json.dumps(calls("set"))
            )
        )
        alone = []
        for call in calls("seq"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('tally.caller', $1, true)", call["caller"])
                statement = (
                    "SELECT tally_apply_group($1::jsonb)::text"  # a group of one: the call alone
                )
                alone.append(json.loads(await conn.fetchval(statement, json.dumps([call])))[0])

        def same(value: Any) -> Any:
            text = json.dumps(value, sort_keys=True).replace('"set-', '"seq-')
            scrubbed = json.loads(text)
            response = scrubbed.get("response") or {}
            for part in ("entry", "reservation"):
                row = response.get(part)
                if row:
                    for column in (
                        "entry_id",
                        "created_at",
                        "reservation_id",
                        "expires_at",
                        "finalized_at",
                    ):
                        row.pop(column, None)
            return scrubbed

        assert [same(r) for r in grouped] == [same(r) for r in alone]
        assert all("error" not in r for r in grouped)
        for kind in kinds:
            assert await state(f"set-{kind}") == await state(f"seq-{kind}"), kind
        crossed = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE account_id LIKE 'set-%'"
        )
        assert crossed == 3  # alert, debit-alert, and two's second reserve
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM reload_intents WHERE account_id = 'set-reload'"
            )
            == 1
        )
        # The single calls were applied as sets: their holds (or entries) carry their
        # run's instant, shared by the accounts of the run.
        held = await conn.fetchval(
            "SELECT count(DISTINCT created_at) FROM holds "
            "WHERE request_id IN ('set-alert-r', 'set-reload-r', 'set-plain-r')"
        )
        assert held == 1
        debited = await conn.fetchval(
            "SELECT count(DISTINCT created_at) FROM ledger_entries "
            "WHERE request_id IN ('set-debit-alert-d', 'set-debit-plain-d')"
        )
        assert debited == 1
    finally:
        await conn.close()


def test_single_calls_of_alerting_and_reloading_accounts_as_a_set(
    own_database_url: str,
) -> None:
    """An account with alerts on available credit or auto-reload, with one call in a
    group, joins the group's run (hold or debit): its one update and reload check are
    the movement's own, so its answer, alerts and reload intent are those of the call
    alone. With two calls it runs one by one."""
    asyncio.run(_alerting_and_reloading_single_calls(own_database_url))
