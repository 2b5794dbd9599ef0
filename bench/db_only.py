"""The database alone: how fast PostgreSQL runs the Debit money function, spread over
many accounts and on one hot account, with no gRPC and no Python in the path.

    python -m bench.db_only [--seconds N] [--clients 1,16] [--scenarios debits,pairs]
                            [--synchronous-commit on,off] [--database-url URL]

Runs ``pgbench`` (the one bundled with pgserver) with a custom script that calls
``tally_move`` exactly as the server does for a Debit (one statement, one transaction,
a fresh request id each time), with ``synchronous_commit`` on (the default, what the
server uses) and off. The difference between the two isolates the cost of the commit's
WAL flush; the difference between spread and hot isolates the account row lock, which
a hot account's movements take one after another.

``--scenarios pairs`` runs Reserve+Capture pairs the same way: ``tally_reserve`` then
``tally_capture`` of its hold (the whole amount), each its own statement and
transaction, spread and hot, and on the hot account 16 Reserves in one
``tally_apply_group`` followed by the 16 Captures in another (group commit).

Every run also reports the CPU time of PostgreSQL's backends per operation (a debit or
a pair): the CPU the postmaster's exited children used during the run, read from /proc
(the pgbench backends exit when it ends; an autovacuum worker ending in the window
counts too). It is the number to compare on a shared machine: waiting for a core, a
lock or the WAL flush does not count.
"""

import argparse
import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.postgres import admin_url, fresh_database, server_facts
from bench.probe import find_postmaster, plain_url

DESCRIPTION = "The Debit money function in PostgreSQL alone (pgbench), spread and hot."
ACCOUNTS = 1000
# Micro-credits: 0.01 credits per debit, 1,000,000 credits per account.
DEBIT_MICROS = 10_000
TOP_UP_MICROS = 1_000_000 * 1_000_000


def _move_call(
    request_id: str, method: str, account: str, kind: str, amount: int, has_grant: bool
) -> str:
    """A call of ``tally_move`` in named notation with the arguments the server passes.

    Later schemas give ``tally_move`` a ``p_grant``: the server passes a purchased
    grant for a top-up and NULL for a debit."""
    grant = ""
    if has_grant:
        grant = (
            ', p_grant => \'{"type": "purchased"}\'' if kind == "credit" else ", p_grant => NULL"
        )
    return (
        f"tally_move(p_request_id => {request_id}, p_fingerprint => '\\x00', "
        f"p_method => '{method}', p_account_id => {account}, p_type => '{kind}', "
        f"p_amount => {amount}, p_description => '', p_reference => '', "
        f"p_metadata => '{{}}'{grant})"
    )


def setup_sql(has_grant: bool) -> str:
    """Creates ``bench-0`` .. ``bench-{ACCOUNTS}`` (the last is the hot one) and funds them,
    in one transaction each."""
    top_up = _move_call(
        "'bench-top-up-' || i", "TopUp", "'bench-' || i", "credit", TOP_UP_MICROS, has_grant
    )
    return f"""
SELECT count(tally_create_account('bench-create-' || i, '\\x00', 'bench-' || i, '', '',
                                  'UTC', 'CREDIT', 0, NULL))
FROM generate_series(0, {ACCOUNTS}) AS i;
SELECT count({top_up}) FROM generate_series(0, {ACCOUNTS}) AS i;
"""


def scripts(has_grant: bool) -> dict[str, str]:
    """pgbench scripts. Request ids: the client id plus a random 63-bit number (a
    collision would only replay the first debit)."""
    spread = _move_call(
        "'s' || :client_id || '-' || :r",
        "Debit",
        "'bench-' || :a",
        "debit",
        -DEBIT_MICROS,
        has_grant,
    )
    hot = _move_call(
        "'h' || :client_id || '-' || :r",
        "Debit",
        f"'bench-{ACCOUNTS}'",
        "debit",
        -DEBIT_MICROS,
        has_grant,
    )
    r = "\\set r random(1, 9223372036854775806)\n"
    return {
        "spread": f"{r}\\set a random(0, {ACCOUNTS - 1})\nSELECT {spread};\n",
        "hot": f"{r}SELECT {hot};\n",
        "hot-grouped": f"{r}SELECT tally_apply_group({_group_of_debits(hot=True)});\n",
        "spread-grouped": (
            r
            + "".join(f"\\set a{i} random(0, {ACCOUNTS - 1})\n" for i in range(GROUP))
            + f"SELECT tally_apply_group({_group_of_debits(hot=False)});\n"
        ),
    }


# Debits per transaction in the grouped scenario: what one server's group commit
# gathers on a hot account.
GROUP = 16


def _group_of_debits(*, hot: bool) -> str:
    """GROUP debits as one ``tally_apply_group`` call (group commit), each with its own
    request id: of the hot account, or each of a random account (spread)."""

    def account(i: int) -> str:
        return f"'bench-{ACCOUNTS}'" if hot else f"'bench-' || :a{i}"

    calls = ", ".join(
        "jsonb_build_object('f', 'tally_move', 'caller', '', 'a', jsonb_build_object("
        f"'request_id', 'g' || :client_id || '-' || :r || '-{i}', 'fingerprint', '00', "
        f"'method', 'Debit', 'account_id', {account(i)}, 'type', 'debit', "
        f"'amount', {-DEBIT_MICROS}, 'description', '', 'reference', '', "
        "'metadata', '{}', 'grant', NULL))"
        for i in range(GROUP)
    )
    return f"p_calls => jsonb_build_array({calls})"


TTL_SECONDS = 300


def _reserve_call(request_id: str, account: str) -> str:
    return (
        f"tally_reserve(p_request_id => {request_id}, p_fingerprint => '\\x00', "
        f"p_account_id => {account}, p_amount => {DEBIT_MICROS}, "
        f"p_ttl_seconds => {TTL_SECONDS}, p_reference => '', p_metadata => '{{}}')"
    )


def _capture_call(request_id: str, reservation: str) -> str:
    return (
        f"tally_capture(p_request_id => {request_id}, p_fingerprint => '\\x00', "
        f"p_reservation_id => {reservation}, p_amount => NULL, p_description => '', "
        "p_metadata => '{}')"
    )


def _pair_script(account: str) -> str:
    """A Reserve, then the Capture of its hold (two statements, two transactions)."""
    reserve = _reserve_call("'r' || :client_id || '-' || :r", account)
    capture = _capture_call("'c' || :client_id || '-' || :r", "CAST(:rid AS uuid)")
    return (
        f"SELECT {reserve} -> 'response' -> 'reservation' ->> 'reservation_id' AS rid \\gset\n"
        f"SELECT {capture};\n"
    )


def _grouped_pairs_script() -> str:
    """GROUP Reserves of the hot account in one ``tally_apply_group``, then their
    Captures in another."""
    reserves = ", ".join(
        "jsonb_build_object('f', 'tally_reserve', 'caller', '', 'a', jsonb_build_object("
        f"'request_id', 'gr' || :client_id || '-' || :r || '-{i}', 'fingerprint', '00', "
        f"'account_id', 'bench-{ACCOUNTS}', 'amount', {DEBIT_MICROS}, "
        f"'ttl_seconds', {TTL_SECONDS}, 'reference', '', 'metadata', '{{}}'))"
        for i in range(GROUP)
    )
    held = (
        "SELECT string_agg(x -> 'response' -> 'reservation' ->> 'reservation_id', ',' "
        "ORDER BY n) AS rids "
        f"FROM jsonb_array_elements(tally_apply_group(p_calls => jsonb_build_array({reserves}))) "
        "WITH ORDINALITY AS y (x, n) \\gset\n"
    )
    capture = (
        "SELECT tally_apply_group(p_calls => (SELECT jsonb_agg(jsonb_build_object("
        "'f', 'tally_capture', 'caller', '', 'a', jsonb_build_object("
        "'request_id', 'gc' || :client_id || '-' || :r || '-' || n, 'fingerprint', '00', "
        "'reservation_id', rid, 'amount', NULL, 'description', '', 'metadata', '{}')) "
        "ORDER BY n) FROM unnest(string_to_array(CAST(:rids AS text), ',')) "
        "WITH ORDINALITY AS u (rid, n)));\n"
    )
    return held + capture


def pair_scripts() -> dict[str, str]:
    r = "\\set r random(1, 9223372036854775806)\n"
    return {
        "pair": f"{r}\\set a random(0, {ACCOUNTS - 1})\n" + _pair_script("'bench-' || :a"),
        "pair-hot": r + _pair_script(f"'bench-{ACCOUNTS}'"),
        "pair-hot-grouped": r + _grouped_pairs_script(),
    }


DEBIT_KINDS = ("spread", "hot", "hot-grouped", "spread-grouped")
PAIR_KINDS = ("pair", "pair-hot", "pair-hot-grouped")
SCENARIOS = {"debits": DEBIT_KINDS, "pairs": PAIR_KINDS}
# Operations (debits or pairs) per pgbench transaction.
PER_TRANSACTION = {"hot-grouped": GROUP, "spread-grouped": GROUP, "pair-hot-grouped": GROUP}


@dataclass
class Run:
    synchronous_commit: str
    clients: int
    kind: str
    tps: float
    latency_ms: float
    failed: int
    cpu_us: float = math.nan  # PostgreSQL backends' CPU per operation


def pgbench() -> str:
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench")


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else math.nan


class BackendCpu:
    """The CPU time of the PostgreSQL server's exited children (its backends), from
    /proc; nothing where the server runs elsewhere."""

    def __init__(self, postmaster: Any) -> None:
        self.postmaster = postmaster

    def children(self) -> int:
        return len(self.postmaster.children()) if self.postmaster is not None else 0

    def read(self) -> float | None:
        if self.postmaster is None:
            return None
        times = self.postmaster.cpu_times()
        return float(times.children_user + times.children_system)

    def settle(self, children: int) -> None:
        """Waits (up to 3 s) until the run's backends have exited and been reaped."""
        deadline = time.monotonic() + 3
        while self.children() > children and time.monotonic() < deadline:
            time.sleep(0.02)


def run_pgbench(
    url: str, script: Path, clients: int, seconds: float, synchronous_commit: str
) -> tuple[float, float, int, int]:
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={synchronous_commit}"}
    command = [pgbench(), "-n", "-M", "prepared", "-c", str(clients), "-j", "1"]
    command += ["-T", str(max(1, round(seconds))), "-f", str(script), plain_url(url)]
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed ({out.returncode}):\n{out.stderr[-2000:]}")
    tps = _number(r"tps = ([0-9.]+)", out.stdout)
    latency = _number(r"latency average = ([0-9.]+) ms", out.stdout)
    failed = _number(r"number of failed transactions: ([0-9]+)", out.stdout)
    done = _number(r"number of transactions actually processed: ([0-9]+)", out.stdout)
    return tps, latency, 0 if math.isnan(failed) else int(failed), int(done)


async def _setup(url: str) -> bool:
    """Creates and funds the accounts; whether ``tally_move`` takes a grant."""
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        has_grant = bool(
            await conn.fetchval(
                "SELECT 'p_grant' = ANY (proargnames) FROM pg_proc WHERE proname = 'tally_move'",
                timeout=30,
            )
        )
        await conn.execute(setup_sql(has_grant), timeout=120)
    finally:
        await conn.close(timeout=30)
    return has_grant


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = [part.strip() for part in value.split(",") if part.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"give some of {', '.join(allowed)}")
        return names

    return parse


def _positive_ints(value: str) -> list[int]:
    levels = [int(part) for part in value.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("give positive integers, e.g. 1,16")
    return levels


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("bench.db_only exceeded its time limit")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.db_only", description=DESCRIPTION)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per pgbench run")
    parser.add_argument("--clients", type=_positive_ints, default=[1, 16])
    parser.add_argument(
        "--scenarios", type=_names(tuple(SCENARIOS)), default=["debits"], help="debits,pairs"
    )
    parser.add_argument("--synchronous-commit", type=_names(("on", "off")), default=["on", "off"])
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    kinds = [k for s in args.scenarios for k in SCENARIOS[s]]
    modes = args.synchronous_commit
    runs_planned = len(modes) * len(kinds) * len(args.clients)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(math.ceil(120 + runs_planned * (args.seconds + 10)))
    runs: list[Run] = []
    try:
        with (
            admin_url(args.database_url or None) as admin,
            fresh_database(admin) as url,
            tempfile.TemporaryDirectory(prefix="tally-bench-pgbench-") as workdir,
        ):
            facts = server_facts(url)
            has_grant = asyncio.run(_setup(url))
            cpu = BackendCpu(find_postmaster(url))
            files = {}
            for kind, text in (scripts(has_grant) | pair_scripts()).items():
                files[kind] = Path(workdir) / f"{kind}.sql"
                files[kind].write_text(text)
            for mode in modes:
                for clients in args.clients:
                    for kind in kinds:
                        children = cpu.children()
                        cpu0 = cpu.read()
                        tps, latency, failed, done = run_pgbench(
                            url, files[kind], clients, args.seconds, mode
                        )
                        cpu.settle(children)
                        cpu1 = cpu.read()
                        per = PER_TRANSACTION.get(kind, 1)
                        tps *= per  # debits or pairs, not transactions
                        cpu_us = math.nan
                        if cpu0 is not None and cpu1 is not None and done:
                            cpu_us = (cpu1 - cpu0) / (done * per) * 1e6
                        runs.append(Run(mode, clients, kind, tps, latency, failed, cpu_us))
                        what = "pairs" if kind in PAIR_KINDS else "debits"
                        print(
                            f"db_only: synchronous_commit={mode} clients={clients} {kind}: "
                            f"{tps:,.0f} {what}/s, {latency:.2f} ms, {failed} failed, "
                            f"PostgreSQL backends {cpu_us:,.0f} µs CPU per op",
                            flush=True,
                        )
    except TimeoutError as e:
        print(f"db_only: {e}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)

    print(f"\nPostgreSQL: {facts.version}\n")
    by_key = {(r.synchronous_commit, r.clients, r.kind): r for r in runs}
    for scenario in args.scenarios:
        spread_kind, hot_kind, grouped_kind, *more = SCENARIOS[scenario]
        unit = "debits" if scenario == "debits" else "pairs"
        extra = f"| spread, {GROUP} a transaction, {unit}/s | grouped / spread " if more else ""
        print(
            f"| synchronous_commit | clients | spread {unit}/s | hot {unit}/s | hot / spread "
            f"| hot, {GROUP} a transaction, {unit}/s | grouped / hot {extra}"
            "| spread ms | hot ms | backend CPU µs per op: spread / hot / grouped"
            + (" / spread grouped |" if more else " |")
        )
        print("| --- " + "| ---: " * (9 + 2 * len(more)) + "|")
        for mode in modes:
            for clients in args.clients:
                spread = by_key[(mode, clients, spread_kind)]
                hot = by_key[(mode, clients, hot_kind)]
                grouped = by_key[(mode, clients, grouped_kind)]
                cells = ""
                per_op = f"{spread.cpu_us:,.0f} / {hot.cpu_us:,.0f} / {grouped.cpu_us:,.0f}"
                for kind in more:
                    other = by_key[(mode, clients, kind)]
                    cells += f"| {other.tps:,.0f} | {other.tps / spread.tps:.1f}x "
                    per_op += f" / {other.cpu_us:,.0f}"
                print(
                    f"| {mode} | {clients} | {spread.tps:,.0f} | {hot.tps:,.0f} "
                    f"| {hot.tps / spread.tps:.0%} | {grouped.tps:,.0f} "
                    f"| {grouped.tps / hot.tps:.1f}x {cells}"
                    f"| {spread.latency_ms:.2f} | {hot.latency_ms:.2f} | {per_op} |"
                )
        print()
    return 1 if any(r.failed for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
