"""Where one money movement's PostgreSQL time goes, with no client, network or commit
in the path.

    python -m bench.move_cost [--movements N] [--database-url URL]

On a fresh database funded like ``bench.db_only``:

1. ``track_functions = 'all'``: N debits of ``tally_move`` run inside one statement
   (spread over the accounts and on the hot account), then N debits in groups of 16 on
   the hot account through ``tally_apply_group``; the self and total time of every
   PL/pgSQL function per movement (``pg_stat_user_functions``).
2. A statement-by-statement copy of ``tally_move``'s Debit path (the same statements on
   the same rows, with a clock read between them) run N times: the cost of each
   statement per movement. It is created in the benchmark database only, and copies
   the path as it was when first measured (an existence check before the lock).
3. Up to 400 Debits, each its own transaction, under ``EXPLAIN (ANALYZE, BUFFERS,
   WAL)``: shared buffer hits and WAL records per Debit, which other load on the
   machine does not change.
"""

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import asyncpg
import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.db_only import ACCOUNTS, DEBIT_MICROS, GROUP, setup_sql
from bench.postgres import admin_url, fresh_database
from bench.probe import plain_url

DESCRIPTION = "Per-movement PostgreSQL time of a Debit, function by function and statement."

# tally_move's Debit path statement by statement (sql/15, 20, 30, 40, 10, 55), timed.
PROFILED = r"""
CREATE FUNCTION bench_profiled_debits(p_n integer, p_hot boolean, p_tag text)
RETURNS TABLE (step text, us_per_movement numeric) LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    u timestamptz;
    acc double precision[] := array_fill(0::double precision, ARRAY[14]);
    names text[] := ARRAY[
        'set_config(tally.caller)', 'exists(account) (folded into the lock since)',
        'lock: SELECT FOR UPDATE',
        'catch-up: due holds/grants', 'replay: key lookup', 'UPDATE accounts',
        'grant draw: SELECT + UPDATE grants', 'INSERT ledger_entries (+trigger, FK)',
        'reload rule', 'response: to_jsonb(entry)', 'INSERT idempotency_keys',
        'settle_expired check (credits and captures only)',
        'whole tally_move (same work, for comparison)',
        'whole tally_apply_group of 16, per movement'];
    a accounts;
    e ledger_entries;
    g record;
    v_id text;
    v_rid text;
    v_hold timestamptz;
    v_grant timestamptz;
    v_left bigint;
    v_take bigint;
    v_first text;
    r jsonb;
    v_calls jsonb;
    i integer;
BEGIN
    FOR i IN 1 .. p_n LOOP
        v_id := CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                     ELSE 'bench-' || (i % $ACCOUNTS$) END;
        v_rid := p_tag || '-p-' || i;
        t := clock_timestamp();
        PERFORM set_config('tally.caller', 'bench', true);
        u := clock_timestamp(); acc[1] := acc[1] + extract(epoch FROM u - t); t := u;
        PERFORM EXISTS (SELECT 1 FROM accounts WHERE account_id = v_id);
        u := clock_timestamp(); acc[2] := acc[2] + extract(epoch FROM u - t); t := u;
        SELECT * INTO a FROM accounts WHERE account_id = v_id FOR UPDATE;
        u := clock_timestamp(); acc[3] := acc[3] + extract(epoch FROM u - t); t := u;
        SELECT min(expires_at) INTO v_hold FROM holds
        WHERE account_id = v_id AND status = 'pending' AND expires_at <= u;
        SELECT min(expires_at) INTO v_grant FROM grants
        WHERE account_id = v_id AND NOT spent AND NOT expired AND expires_at <= u;
        u := clock_timestamp(); acc[4] := acc[4] + extract(epoch FROM u - t); t := u;
        PERFORM * FROM idempotency_keys WHERE request_id = v_rid;
        u := clock_timestamp(); acc[5] := acc[5] + extract(epoch FROM u - t); t := u;
        UPDATE accounts
        SET balance = balance - $DEBIT$, reserved = reserved + 0,
            last_sequence = last_sequence + 1,
            balance_updated_at = greatest(balance_updated_at, clock_timestamp())
        WHERE account_id = v_id RETURNING * INTO a;
        u := clock_timestamp(); acc[6] := acc[6] + extract(epoch FROM u - t); t := u;
        v_left := $DEBIT$;
        v_first := NULL;
        FOR g IN
            SELECT grant_id, remaining, grant_type FROM grants
            WHERE account_id = v_id AND NOT spent
            ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
        LOOP
            v_take := least(v_left, g.remaining);
            UPDATE grants SET remaining = remaining - v_take WHERE grant_id = g.grant_id;
            v_first := coalesce(v_first, g.grant_type);
            v_left := v_left - v_take;
            EXIT WHEN v_left = 0;
        END LOOP;
        u := clock_timestamp(); acc[7] := acc[7] + extract(epoch FROM u - t); t := u;
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, reservation_id, created_at, credit_type
        ) VALUES (
            v_id, a.last_sequence, 'debit', -$DEBIT$, a.balance, '', '', '{}', v_rid, NULL,
            a.balance_updated_at, v_first
        ) RETURNING * INTO e;
        u := clock_timestamp(); acc[8] := acc[8] + extract(epoch FROM u - t); t := u;
        PERFORM tally_maybe_reload(a, a.balance - a.reserved + $DEBIT$);
        u := clock_timestamp(); acc[9] := acc[9] + extract(epoch FROM u - t); t := u;
        r := jsonb_build_object('entry', to_jsonb(e));
        u := clock_timestamp(); acc[10] := acc[10] + extract(epoch FROM u - t); t := u;
        INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
        VALUES (v_rid, 'Debit', '\x00', r);
        r := jsonb_build_object('replayed', false, 'response', r);
        u := clock_timestamp(); acc[11] := acc[11] + extract(epoch FROM u - t); t := u;
        PERFORM EXISTS (SELECT 1 FROM grants
                        WHERE account_id = v_id AND NOT spent AND expired);
        u := clock_timestamp(); acc[12] := acc[12] + extract(epoch FROM u - t); t := u;
    END LOOP;
    -- The real function, the same number of times, for comparison with the sum.
    FOR i IN 1 .. p_n LOOP
        v_id := CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                     ELSE 'bench-' || (i % $ACCOUNTS$) END;
        t := clock_timestamp();
        PERFORM set_config('tally.caller', 'bench', true);
        PERFORM tally_move(p_tag || '-m-' || i, '\x00', 'Debit', v_id, 'debit', -$DEBIT$,
                           '', '', '{}', NULL);
        u := clock_timestamp(); acc[13] := acc[13] + extract(epoch FROM u - t);
    END LOOP;
    FOR i IN 1 .. p_n / $GROUP$ LOOP
        SELECT jsonb_agg(jsonb_build_object('f', 'tally_move', 'caller', 'bench',
            'a', jsonb_build_object(
                'request_id', p_tag || '-g-' || i || '-' || j, 'fingerprint', '00',
                'method', 'Debit', 'account_id',
                CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                     ELSE 'bench-' || ((i * $GROUP$ + j) % $ACCOUNTS$) END,
                'type', 'debit', 'amount', -$DEBIT$, 'description', '', 'reference', '',
                'metadata', '{}', 'grant', NULL)))
        INTO v_calls FROM generate_series(1, $GROUP$) AS j;
        t := clock_timestamp();
        PERFORM tally_apply_group(v_calls);
        u := clock_timestamp(); acc[14] := acc[14] + extract(epoch FROM u - t);
    END LOOP;
    FOR i IN 1 .. 14 LOOP
        step := names[i];
        us_per_movement := round((acc[i] * 1e6 / p_n)::numeric, 1);
        RETURN NEXT;
    END LOOP;
END $$;
"""


def profiled_sql() -> str:
    return (
        PROFILED.replace("$ACCOUNTS$", str(ACCOUNTS))
        .replace("$DEBIT$", str(DEBIT_MICROS))
        .replace("$GROUP$", str(GROUP))
    )


FUNCTIONS = """
SELECT funcname, calls, round((self_time * 1000 / $1)::numeric, 1) AS self_us,
       round((total_time * 1000 / $1)::numeric, 1) AS total_us
FROM pg_stat_user_functions WHERE funcname LIKE 'tally%' ORDER BY self_time DESC
"""


def _move(request_id: str, account: str) -> str:
    return (
        f"tally_move({request_id}, '\\x00', 'Debit', {account}, 'debit', {-DEBIT_MICROS}, "
        "'', '', '{}', NULL)"
    )


# This backend's row updates and HOT updates in its transaction so far, per table.
_UPDATES = """
SELECT relname, pg_stat_get_xact_tuples_updated(oid) AS updates,
       pg_stat_get_xact_tuples_hot_updated(oid) AS hot
FROM pg_class WHERE relname IN ('accounts', 'grants') AND relkind = 'r' ORDER BY relname
"""


async def _hot_line(conn: asyncpg.Connection) -> str:
    """The updates of accounts and grants in the connection's open transaction, and
    how many of them were HOT (no new index entries)."""
    rows = await conn.fetch(_UPDATES)
    return "HOT: " + ", ".join(
        f"{r['relname']} {r['hot']:,} of {r['updates']:,} updates" for r in rows
    )


async def _functions(url: str, n: int, label: str, statement: str) -> None:
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await conn.execute("SET track_functions = 'all'")
        await conn.execute("SELECT pg_stat_reset()")
        await conn.execute("SELECT set_config('tally.caller', 'bench', false)")
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        async with conn.transaction():
            cpu = backend.cpu_times()
            await conn.execute(statement, timeout=600)
            cpu_after = backend.cpu_times()
            hot = await _hot_line(conn)
        await conn.execute("SELECT pg_stat_force_next_flush()")
    finally:
        await conn.close()
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        rows = await conn.fetch(FUNCTIONS, n)
    finally:
        await conn.close()
    print(f"\n{label}: {n} movements, pg_stat_user_functions per movement")
    print("| function | calls | self µs | total µs |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['funcname']} | {row['calls']} | {row['self_us']} | {row['total_us']} |")
    used = cpu_after.user + cpu_after.system - cpu.user - cpu.system
    print(f"{hot}; backend CPU {used * 1e6 / n:,.0f} µs per movement")


async def _work(url: str, n: int, hot_account: bool) -> None:
    """Work that does not depend on the machine's other load: n Debits, each its own
    transaction (as the server runs a lone Debit), under EXPLAIN (ANALYZE, BUFFERS,
    WAL); shared buffer hits and WAL per Debit, after n / 4 Debits of warm-up."""
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    hits = records = wal_bytes = 0
    try:
        for i in range(-(n // 4), n):
            account = f"'bench-{ACCOUNTS if hot_account else (i * 7919) % ACCOUNTS}'"
            move = _move(f"'w{int(hot_account)}-{i}'", account)
            if i < 0:
                await conn.execute(f"SELECT {move}")
                continue
            explained = await conn.fetchval(
                f"EXPLAIN (ANALYZE, BUFFERS, WAL, TIMING OFF, FORMAT JSON) SELECT {move}"
            )
            plan = json.loads(explained)[0]["Plan"]
            hits += plan["Shared Hit Blocks"]
            records += plan["WAL Records"]
            wal_bytes += plan["WAL Bytes"]
    finally:
        await conn.close()
    where = "hot account" if hot_account else "spread"
    print(
        f"\nWork per Debit, {where}, {n} Debits each its own transaction: "
        f"{hits / n:.1f} shared buffer hits, {records / n:.2f} WAL records, "
        f"{wal_bytes / n:,.0f} WAL bytes"
    )


async def run(url: str, n: int) -> None:
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await conn.execute(setup_sql(True), timeout=300)
        await conn.execute(profiled_sql())
    finally:
        await conn.close()
    spread = _move("'fs-' || i", f"'bench-' || (i % {ACCOUNTS})")
    await _functions(
        url, n, "tally_move, spread", f"SELECT count({spread}) FROM generate_series(1, {n}) i"
    )
    hot = _move("'fh-' || i", f"'bench-{ACCOUNTS}'")
    await _functions(
        url, n, "tally_move, hot", f"SELECT count({hot}) FROM generate_series(1, {n}) i"
    )
    group = (
        "SELECT count(tally_apply_group(c)) FROM (SELECT jsonb_agg(jsonb_build_object("
        "'f', 'tally_move', 'caller', 'bench', 'a', jsonb_build_object("
        "'request_id', 'fg-' || i || '-' || j, 'fingerprint', '00', 'method', 'Debit', "
        f"'account_id', 'bench-{ACCOUNTS}', 'type', 'debit', 'amount', {-DEBIT_MICROS}, "
        "'description', '', 'reference', '', 'metadata', '{}', 'grant', NULL))) AS c "
        f"FROM generate_series(1, {n // GROUP}) i, generate_series(1, {GROUP}) j "
        "GROUP BY i) g"
    )
    await _functions(url, n, f"tally_apply_group of {GROUP}, hot", group)
    for hot_account in (False, True):
        conn = await asyncpg.connect(plain_url(url), timeout=30)
        try:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT * FROM bench_profiled_debits($1, $2, $3)",
                    n,
                    hot_account,
                    f"st{int(hot_account)}",
                    timeout=600,
                )
                hot = await _hot_line(conn)
        finally:
            await conn.close()
        where = "hot account" if hot_account else "spread"
        print(f"\nStatement by statement, {where}, {n} movements in one transaction")
        print("| step | µs per movement |")
        print("| --- | ---: |")
        for row in rows:
            print(f"| {row['step']} | {row['us_per_movement']} |")
        print(hot)
    for hot_account in (False, True):
        await _work(url, min(n, 400), hot_account)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.move_cost", description=DESCRIPTION)
    parser.add_argument("--movements", type=int, default=2000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with admin_url(args.database_url or None) as admin, fresh_database(admin) as url:
        asyncio.run(run(url, args.movements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
