"""Where one money movement's PostgreSQL time goes, with no client, network or commit
in the path.

    python -m bench.move_cost [--movements N] [--kind debit,pair] [--database-url URL]

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

``--kind pair`` does the same for a Reserve followed by the Capture of its hold:
N pairs spread and on the hot account (``pg_stat_user_functions``), N pairs through
``tally_apply_group`` in groups of 16 calls mixed as the server forms them (each group
the new Reserves of half of its calls and the Captures of the previous group's
holds), a statement-by-statement copy of both paths, and, as 3. for Debits, up to 400
pairs with each call its own transaction under ``EXPLAIN (ANALYZE, BUFFERS, WAL)``
(buffer hits and WAL per pair, the holds' updates that were HOT, and the backend's CPU
per pair over as many more pairs run plainly).
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

DESCRIPTION = (
    "Per-movement PostgreSQL time of a Debit or a Reserve+Capture pair, function by "
    "function and statement."
)
KINDS = ("debit", "pair")
TTL_SECONDS = 300

# tally_move's Debit path statement by statement (sql/15, 20, 30, 40, 10, 55), timed.
PROFILED = r"""
CREATE FUNCTION bench_profiled_debits(p_n integer, p_hot boolean, p_tag text)
RETURNS TABLE (step text, us_per_movement numeric) LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    u timestamptz;
    v_mark text;
    acc double precision[] := array_fill(0::double precision, ARRAY[14]);
    names text[] := ARRAY[
        'set_config(tally.caller)', 'exists(account) (folded into the lock since)',
        'lock: SELECT FOR UPDATE',
        'catch-up: due holds/grants', 'replay: key lookup', 'UPDATE accounts',
        'grant draw: SELECT + UPDATE grants', 'INSERT ledger_entries (+triggers, mark)',
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
        v_mark := set_config('tally.references_checked', 'on', true);  -- as tally_post_entry
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, reservation_id, created_at, credit_type
        ) VALUES (
            v_id, a.last_sequence, 'debit', -$DEBIT$, a.balance, '', '', '{}', v_rid, NULL,
            a.balance_updated_at, v_first
        ) RETURNING * INTO e;
        v_mark := set_config('tally.references_checked', '', true);
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


# Reserve's and Capture's paths statement by statement (sql/20, 10, 50, 30, 40), timed.
PROFILED_PAIRS = r"""
CREATE FUNCTION bench_profiled_pairs(p_n integer, p_hot boolean, p_tag text)
RETURNS TABLE (step text, us_per_pair numeric) LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    u timestamptz;
    v_mark text;
    acc double precision[] := array_fill(0::double precision, ARRAY[24]);
    names text[] := ARRAY[
        'Reserve: set_config(tally.caller)',
        'Reserve: lock: SELECT accounts FOR UPDATE',
        'Reserve: catch-up: due holds/grants',
        'Reserve: replay: key lookup',
        'Reserve: INSERT holds (4 indexes, FK to accounts)',
        'Reserve: UPDATE accounts (reserved)',
        'Reserve: reload check (SELECT accounts + tally_maybe_reload)',
        'Reserve: response: to_jsonb(hold)',
        'Reserve: INSERT idempotency_keys',
        'Capture: set_config(tally.caller)',
        'Capture: hold''s account: SELECT holds by id',
        'Capture: lock: SELECT accounts FOR UPDATE',
        'Capture: catch-up: due holds/grants',
        'Capture: the hold again, under the lock',
        'Capture: replay: key lookup',
        'Capture: open usage job? (usage_events by reservation)',
        'Capture: UPDATE holds (status, captured, finalized_at)',
        'Capture: UPDATE accounts (balance, reserved, last_sequence)',
        'Capture: grant draw: SELECT + UPDATE grants',
        'Capture: INSERT ledger_entries (FKs to accounts and holds)',
        'Capture: settle_expired check (expired grants?)',
        'Capture: response: to_jsonb(hold), to_jsonb(entry)',
        'Capture: INSERT idempotency_keys',
        'whole tally_reserve + tally_capture (same work, for comparison)'];
    a accounts;
    a2 accounts;
    h holds;
    e ledger_entries;
    g record;
    v_id text;
    v_acc text;
    v_rid text;
    v_hold timestamptz;
    v_grant timestamptz;
    v_left bigint;
    v_take bigint;
    v_first text;
    v_res uuid;
    r jsonb;
    i integer;
BEGIN
    FOR i IN 1 .. p_n LOOP
        v_id := CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                     ELSE 'bench-' || (i % $ACCOUNTS$) END;
        v_rid := p_tag || '-pr-' || i;
        t := clock_timestamp();
        PERFORM set_config('tally.caller', 'bench', true);
        u := clock_timestamp(); acc[1] := acc[1] + extract(epoch FROM u - t); t := u;
        SELECT * INTO a FROM accounts WHERE account_id = v_id FOR UPDATE;
        u := clock_timestamp(); acc[2] := acc[2] + extract(epoch FROM u - t); t := u;
        SELECT (SELECT min(expires_at) FROM holds
                WHERE account_id = v_id AND status = 'pending' AND expires_at <= u),
               (SELECT min(expires_at) FROM grants
                WHERE account_id = v_id AND NOT spent AND NOT expired
                  AND expires_at <= u)
        INTO v_hold, v_grant;
        u := clock_timestamp(); acc[3] := acc[3] + extract(epoch FROM u - t); t := u;
        PERFORM * FROM idempotency_keys WHERE request_id = v_rid;
        u := clock_timestamp(); acc[4] := acc[4] + extract(epoch FROM u - t); t := u;
        INSERT INTO holds (account_id, status, amount, expires_at, reference, metadata,
                           request_id)
        VALUES (v_id, 'pending', $DEBIT$, clock_timestamp() + make_interval(secs => 300),
                '', '{}', v_rid)
        RETURNING * INTO h;
        u := clock_timestamp(); acc[5] := acc[5] + extract(epoch FROM u - t); t := u;
        UPDATE accounts SET reserved = reserved + $DEBIT$, balance_updated_at = h.created_at
        WHERE account_id = v_id;
        u := clock_timestamp(); acc[6] := acc[6] + extract(epoch FROM u - t); t := u;
        -- The reload check as Reserve made it before (a second read of the account).
        SELECT * INTO a2 FROM accounts WHERE account_id = v_id;
        PERFORM tally_maybe_reload(a2, a.balance - a.reserved);
        u := clock_timestamp(); acc[7] := acc[7] + extract(epoch FROM u - t); t := u;
        r := jsonb_build_object('reservation', to_jsonb(h));
        u := clock_timestamp(); acc[8] := acc[8] + extract(epoch FROM u - t); t := u;
        INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
        VALUES (v_rid, 'Reserve', '\x00', r);
        r := jsonb_build_object('replayed', false, 'response', r);
        u := clock_timestamp(); acc[9] := acc[9] + extract(epoch FROM u - t); t := u;
        -- The Capture of that hold.
        v_res := h.reservation_id;
        v_rid := p_tag || '-pc-' || i;
        PERFORM set_config('tally.caller', 'bench', true);
        u := clock_timestamp(); acc[10] := acc[10] + extract(epoch FROM u - t); t := u;
        SELECT account_id INTO v_acc FROM holds WHERE reservation_id = v_res;
        u := clock_timestamp(); acc[11] := acc[11] + extract(epoch FROM u - t); t := u;
        SELECT * INTO a FROM accounts WHERE account_id = v_acc FOR UPDATE;
        u := clock_timestamp(); acc[12] := acc[12] + extract(epoch FROM u - t); t := u;
        SELECT (SELECT min(expires_at) FROM holds
                WHERE account_id = v_acc AND status = 'pending' AND expires_at <= u),
               (SELECT min(expires_at) FROM grants
                WHERE account_id = v_acc AND NOT spent AND NOT expired
                  AND expires_at <= u)
        INTO v_hold, v_grant;
        u := clock_timestamp(); acc[13] := acc[13] + extract(epoch FROM u - t); t := u;
        SELECT * INTO h FROM holds WHERE reservation_id = v_res;
        u := clock_timestamp(); acc[14] := acc[14] + extract(epoch FROM u - t); t := u;
        PERFORM * FROM idempotency_keys WHERE request_id = v_rid;
        u := clock_timestamp(); acc[15] := acc[15] + extract(epoch FROM u - t); t := u;
        -- As tally_capture evaluates it (a PERFORM would plan the SQL function anew).
        r := coalesce(NULL::jsonb, tally_refuse_usage_hold(h), tally_require_pending(h));
        u := clock_timestamp(); acc[16] := acc[16] + extract(epoch FROM u - t); t := u;
        UPDATE holds SET status = 'captured', captured = h.amount,
                         finalized_at = clock_timestamp()
        WHERE reservation_id = v_res RETURNING * INTO h;
        u := clock_timestamp(); acc[17] := acc[17] + extract(epoch FROM u - t); t := u;
        UPDATE accounts
        SET balance = balance - h.amount, reserved = reserved - h.amount,
            last_sequence = last_sequence + 1,
            balance_updated_at = greatest(balance_updated_at, clock_timestamp())
        WHERE account_id = v_acc RETURNING * INTO a;
        u := clock_timestamp(); acc[18] := acc[18] + extract(epoch FROM u - t); t := u;
        v_left := h.amount;
        v_first := NULL;
        FOR g IN
            SELECT grant_id, remaining, grant_type FROM grants
            WHERE account_id = v_acc AND NOT spent
            ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
        LOOP
            v_take := least(v_left, g.remaining);
            UPDATE grants SET remaining = remaining - v_take WHERE grant_id = g.grant_id;
            v_first := coalesce(v_first, g.grant_type);
            v_left := v_left - v_take;
            EXIT WHEN v_left = 0;
        END LOOP;
        u := clock_timestamp(); acc[19] := acc[19] + extract(epoch FROM u - t); t := u;
        v_mark := set_config('tally.references_checked', 'on', true);  -- as tally_post_entry
        INSERT INTO ledger_entries (
            account_id, sequence, entry_type, amount, balance_after, description,
            reference, metadata, request_id, reservation_id, created_at, credit_type
        ) VALUES (
            v_acc, a.last_sequence, 'debit', -h.amount, a.balance, '', h.reference,
            h.metadata, v_rid, v_res, a.balance_updated_at, v_first
        ) RETURNING * INTO e;
        v_mark := set_config('tally.references_checked', '', true);
        u := clock_timestamp(); acc[20] := acc[20] + extract(epoch FROM u - t); t := u;
        PERFORM EXISTS (SELECT 1 FROM grants
                        WHERE account_id = v_acc AND NOT spent AND expired);
        u := clock_timestamp(); acc[21] := acc[21] + extract(epoch FROM u - t); t := u;
        r := jsonb_build_object('reservation', to_jsonb(h), 'entry', to_jsonb(e));
        u := clock_timestamp(); acc[22] := acc[22] + extract(epoch FROM u - t); t := u;
        INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
        VALUES (v_rid, 'Capture', '\x00', r);
        r := jsonb_build_object('replayed', false, 'response', r);
        u := clock_timestamp(); acc[23] := acc[23] + extract(epoch FROM u - t); t := u;
    END LOOP;
    -- The real functions, the same number of times, for comparison with the sum.
    FOR i IN 1 .. p_n LOOP
        v_id := CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                     ELSE 'bench-' || (i % $ACCOUNTS$) END;
        t := clock_timestamp();
        PERFORM set_config('tally.caller', 'bench', true);
        r := $RESERVE$;
        PERFORM set_config('tally.caller', 'bench', true);
        PERFORM $CAPTURE$;
        u := clock_timestamp(); acc[24] := acc[24] + extract(epoch FROM u - t);
    END LOOP;
    FOR i IN 1 .. 24 LOOP
        step := names[i];
        us_per_pair := round((acc[i] * 1e6 / p_n)::numeric, 1);
        RETURN NEXT;
    END LOOP;
END $$;
"""


# Pairs through group commit, as the server forms groups under a steady load: each group
# holds the Reserves of `p_group / 2` new pairs and the Captures of the previous group's
# holds (the last group captures only).
GROUPED_PAIRS = r"""
CREATE FUNCTION bench_grouped_pairs(p_n integer, p_hot boolean, p_tag text, p_group integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_half integer := p_group / 2;
    v_reserves integer;
    v_held text[] := '{}';
    v_calls jsonb;
    v_answers jsonb;
    v_new text[];
    v_done bigint := 0;
    i integer := 0;
BEGIN
    WHILE v_done < p_n LOOP
        -- This round's reserves: v_half, fewer in the last round when p_n is not a
        -- multiple of it (the loop ends when every reserve is captured).
        v_reserves := greatest(0, least(v_half, p_n - i * v_half));
        SELECT coalesce(jsonb_agg(c ORDER BY k), '[]') INTO v_calls FROM (
            SELECT j AS k, jsonb_build_object('f', 'tally_reserve', 'caller', 'bench',
                'a', jsonb_build_object(
                    'request_id', p_tag || '-gr-' || i || '-' || j, 'fingerprint', '00',
                    'account_id', CASE WHEN p_hot THEN 'bench-' || $ACCOUNTS$
                        ELSE 'bench-' || ((i * v_half + j) % $ACCOUNTS$) END,
                    'amount', $DEBIT$, 'ttl_seconds', $TTL$, 'reference', '',
                    'metadata', '{}')) AS c
            FROM generate_series(1, v_reserves) AS j
            UNION ALL
            SELECT v_half + n, jsonb_build_object('f', 'tally_capture', 'caller', 'bench',
                'a', jsonb_build_object(
                    'request_id', p_tag || '-gc-' || i || '-' || n, 'fingerprint', '00',
                    'reservation_id', rid, 'amount', NULL, 'description', '',
                    'metadata', '{}'))
            FROM unnest(v_held) WITH ORDINALITY AS u (rid, n)) calls;
        v_answers := tally_apply_group(v_calls);
        v_done := v_done + cardinality(v_held);
        SELECT coalesce(array_agg(x->'response'->'reservation'->>'reservation_id'
                                  ORDER BY k), '{}')
        INTO v_new
        FROM jsonb_array_elements(v_answers) WITH ORDINALITY AS y (x, k)
        WHERE k <= v_reserves;
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_answers) x WHERE x ? 'error') THEN
            RAISE EXCEPTION 'a grouped call was refused: %', v_answers;
        END IF;
        v_held := v_new;
        i := i + 1;
    END LOOP;
    RETURN v_done;
END $$;
"""


def _reserve(request_id: str, account: str) -> str:
    return (
        f"tally_reserve({request_id}, '\\x00', {account}, {DEBIT_MICROS}, {TTL_SECONDS}, "
        "'', '{}')"
    )


def _capture(request_id: str, reserved: str) -> str:
    """The Capture (of the whole hold) of the reservation a Reserve answered."""
    return (
        f"tally_capture({request_id}, '\\x00', "
        f"({reserved} -> 'response' -> 'reservation' ->> 'reservation_id')::uuid, "
        "NULL, '', '{}')"
    )


def pairs_sql() -> str:
    reserve = _reserve("v_rid", "v_id").replace("v_rid", "p_tag || '-mr-' || i")
    capture = _capture("p_tag || '-mc-' || i", "r")
    return (
        (PROFILED_PAIRS + GROUPED_PAIRS)
        .replace("$RESERVE$", reserve)
        .replace("$CAPTURE$", capture)
        .replace("$ACCOUNTS$", str(ACCOUNTS))
        .replace("$DEBIT$", str(DEBIT_MICROS))
        .replace("$TTL$", str(TTL_SECONDS))
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
FROM pg_class WHERE relname IN ('accounts', 'grants', 'holds') AND relkind = 'r'
ORDER BY relname
"""


async def _hot_line(conn: asyncpg.Connection) -> str:
    """The updates of accounts, grants and holds in the connection's open transaction,
    and how many of them were HOT (no new index entries)."""
    rows = await conn.fetch(_UPDATES)
    return "HOT: " + ", ".join(
        f"{r['relname']} {r['hot']:,} of {r['updates']:,} updates" for r in rows
    )


async def _functions(url: str, n: int, label: str, statement: str, unit: str) -> None:
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
    print(f"\n{label}: {n} {unit}s, pg_stat_user_functions per {unit}")
    print("| function | calls | self µs | total µs |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['funcname']} | {row['calls']} | {row['self_us']} | {row['total_us']} |")
    used = cpu_after.user + cpu_after.system - cpu.user - cpu.system
    print(f"{hot}; backend CPU {used * 1e6 / n:,.0f} µs per {unit}")


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


async def _pair_work(url: str, n: int, hot_account: bool, run: int = 0) -> None:
    """As _work, for n Reserve+Capture pairs: each call its own transaction under
    EXPLAIN (ANALYZE, BUFFERS, WAL), after n / 4 pairs of warm-up; then the holds'
    updates that were HOT, and the backend's CPU per pair over n more pairs run
    plainly (each call its own transaction, no EXPLAIN)."""
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    hits = records = wal_bytes = 0
    tag = f"pw{run}-{int(hot_account)}"
    try:
        before = await conn.fetchrow(_HOLD_UPDATES)
        for i in range(-(n // 4), n):
            account = f"'bench-{ACCOUNTS if hot_account else (i * 7919) % ACCOUNTS}'"
            reserve = _reserve(f"'{tag}-r{i}'", account)
            if i < 0:
                reserved = await conn.fetchval(f"SELECT {reserve}::text")
                capture = _capture(f"'{tag}-c{i}'", f"'{reserved}'::jsonb")
                await conn.execute(f"SELECT {capture}")
                continue
            plans = [
                await conn.fetchval(
                    f"EXPLAIN (ANALYZE, BUFFERS, WAL, TIMING OFF, FORMAT JSON) SELECT {reserve}"
                )
            ]
            reservation = await conn.fetchval(
                "SELECT reservation_id::text FROM holds WHERE request_id = $1", f"{tag}-r{i}"
            )
            plans.append(
                await conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, WAL, TIMING OFF, FORMAT JSON) SELECT "
                    f"tally_capture('{tag}-c{i}', '\\x00', '{reservation}', NULL, '', '{{}}')"
                )
            )
            for explained in plans:
                plan = json.loads(explained)[0]["Plan"]
                hits += plan["Shared Hit Blocks"]
                records += plan["WAL Records"]
                wal_bytes += plan["WAL Bytes"]
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        cpu = backend.cpu_times()
        for i in range(n):
            account = f"'bench-{ACCOUNTS if hot_account else (i * 7919) % ACCOUNTS}'"
            reserve = _reserve(f"'{tag}-R{i}'", account)
            reserved = await conn.fetchval(f"SELECT {reserve}::text")
            capture = _capture(f"'{tag}-C{i}'", f"'{reserved}'::jsonb")
            await conn.execute(f"SELECT {capture}")
        cpu_after = backend.cpu_times()
        await asyncio.sleep(0.7)  # the statistics reach the shared counters
        after = await conn.fetchrow(_HOLD_UPDATES)
    finally:
        await conn.close()
    where = "hot account" if hot_account else "spread"
    used = cpu_after.user + cpu_after.system - cpu.user - cpu.system
    print(
        f"\nWork per pair, {where}, {n} pairs each call its own transaction: "
        f"{hits / n:.1f} shared buffer hits, {records / n:.2f} WAL records, "
        f"{wal_bytes / n:,.0f} WAL bytes; holds {after['hot'] - before['hot']:,} HOT of "
        f"{after['upd'] - before['upd']:,} updates; backend CPU {used * 1e6 / n:,.0f} µs "
        f"per pair over {n} more"
    )


_HOLD_UPDATES = (
    "SELECT n_tup_upd AS upd, n_tup_hot_upd AS hot FROM pg_stat_user_tables WHERE relname = 'holds'"
)


async def _statements(url: str, n: int, function: str, unit: str) -> None:
    for hot_account in (False, True):
        conn = await asyncpg.connect(plain_url(url), timeout=30)
        try:
            async with conn.transaction():
                rows = await conn.fetch(
                    f"SELECT * FROM {function}($1, $2, $3)",
                    n,
                    hot_account,
                    f"st{int(hot_account)}",
                    timeout=600,
                )
                hot = await _hot_line(conn)
        finally:
            await conn.close()
        where = "hot account" if hot_account else "spread"
        print(f"\nStatement by statement, {where}, {n} {unit}s in one transaction")
        print(f"| step | µs per {unit} |")
        print("| --- | ---: |")
        for row in rows:
            print(f"| {row['step']} | {row[1]} |")
        print(hot)


async def debits(url: str, n: int) -> None:
    spread = _move("'fs-' || i", f"'bench-' || (i % {ACCOUNTS})")
    await _functions(
        url,
        n,
        "tally_move, spread",
        f"SELECT count({spread}) FROM generate_series(1, {n}) i",
        "movement",
    )
    hot = _move("'fh-' || i", f"'bench-{ACCOUNTS}'")
    await _functions(
        url,
        n,
        "tally_move, hot",
        f"SELECT count({hot}) FROM generate_series(1, {n}) i",
        "movement",
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
    await _functions(url, n, f"tally_apply_group of {GROUP}, hot", group, "movement")
    await _statements(url, n, "bench_profiled_debits", "movement")
    for hot_account in (False, True):
        await _work(url, min(n, 400), hot_account)


async def pairs(url: str, n: int) -> None:
    for where, account in (("spread", f"'bench-' || (i % {ACCOUNTS})"), ("hot", None)):
        account = account or f"'bench-{ACCOUNTS}'"
        reserve = _reserve(f"'p{where}-r-' || i", account)
        capture = _capture(f"'p{where}-c-' || i", reserve)
        await _functions(
            url,
            n,
            f"tally_reserve + tally_capture, {where}",
            f"SELECT count({capture}) FROM generate_series(1, {n}) i",
            "pair",
        )
    for hot_account in (False, True):
        where = "hot" if hot_account else "spread"
        await _functions(
            url,
            n,
            f"tally_apply_group of {GROUP} (Reserves and Captures mixed), {where}",
            f"SELECT bench_grouped_pairs({n}, {hot_account}, 'pg{int(hot_account)}', {GROUP})",
            "pair",
        )
    await _statements(url, n, "bench_profiled_pairs", "pair")
    for hot_account in (False, True):
        await _pair_work(url, min(n, 400), hot_account)
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await asyncio.sleep(0.7)  # the statistics reach the shared counters
        rows = await conn.fetch(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
            "WHERE relname IN ('accounts', 'holds', 'grants') ORDER BY relname"
        )
    finally:
        await conn.close()
    print("\nUpdates since the start (HOT: no index entry written)")
    print("| table | updates | HOT updates |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['relname']} | {row['n_tup_upd']} | {row['n_tup_hot_upd']} |")


async def run(url: str, n: int, kinds: Sequence[str]) -> None:
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await conn.execute(setup_sql(True), timeout=300)
        await conn.execute(profiled_sql())
        await conn.execute(pairs_sql())
    finally:
        await conn.close()
    if "debit" in kinds:
        await debits(url, n)
    if "pair" in kinds:
        await pairs(url, n)


def _kinds(value: str) -> list[str]:
    kinds = [part.strip() for part in value.split(",") if part.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"give some of {', '.join(KINDS)}")
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.move_cost", description=DESCRIPTION)
    parser.add_argument("--movements", type=int, default=2000)
    parser.add_argument(
        "--kind", type=_kinds, default=["debit"], help="debit, pair, or both: debit,pair"
    )
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with admin_url(args.database_url or None) as admin, fresh_database(admin) as url:
        asyncio.run(run(url, args.movements, args.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
