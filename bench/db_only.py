"""The database alone: how fast PostgreSQL runs the Debit money function, spread over
many accounts and on one hot account, with no gRPC and no Python in the path.

    python -m bench.db_only [--seconds N] [--clients 1,16] [--database-url URL]

Runs ``pgbench`` (the one bundled with pgserver) with a custom script that calls
``tally_move`` exactly as the server does for a Debit (one statement, one transaction,
a fresh request id each time), with ``synchronous_commit`` on (the default, what the
server uses) and off. The difference between the two isolates the cost of the commit's
WAL flush; the difference between spread and hot isolates the account row lock, which
a hot account's movements take one after another.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped,unused-ignore]

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


KINDS = ("spread", "hot", "hot-grouped", "spread-grouped")
REAP_SECONDS = 1.0


@dataclass
class Run:
    synchronous_commit: str
    clients: int
    kind: str
    tps: float
    latency_ms: float
    failed: int
    # PostgreSQL CPU (every process of the server) per debit, µs; NaN if not local
    postgres_us: float = math.nan


def pgbench() -> str:
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench")


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else math.nan


def run_pgbench(
    url: str, script: Path, clients: int, seconds: float, synchronous_commit: str
) -> tuple[float, float, int]:
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
    return tps, latency, 0 if math.isnan(failed) else int(failed)


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


def _postgres_cpu_seconds(postmaster: Any) -> float:
    """CPU seconds of the postmaster, its live children, and the children it has
    reaped (pgbench's backends exit at the end of each run)."""
    if postmaster is None:
        return math.nan
    try:
        times = postmaster.cpu_times()
        total = float(times.user + times.system + times.children_user + times.children_system)
        for child in postmaster.children():
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except psutil.Error:
                pass
    except psutil.Error:
        return math.nan
    return total


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
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    runs_planned = 2 * len(KINDS) * len(args.clients)
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
            postmaster = find_postmaster(url)
            files = {}
            for kind, text in scripts(has_grant).items():
                files[kind] = Path(workdir) / f"{kind}.sql"
                files[kind].write_text(text)
            for mode in ("on", "off"):
                for clients in args.clients:
                    for kind in KINDS:
                        cpu_before = _postgres_cpu_seconds(postmaster)
                        tps, latency, failed = run_pgbench(
                            url, files[kind], clients, args.seconds, mode
                        )
                        # the backends exit after pgbench: wait until the postmaster has
                        # reaped them, so that their CPU is in its children's times
                        time.sleep(REAP_SECONDS)
                        cpu = _postgres_cpu_seconds(postmaster) - cpu_before
                        if kind.endswith("-grouped"):
                            tps *= GROUP  # debits, not transactions
                        # pgbench runs -T seconds; its tps is over that window
                        debits = tps * max(1, round(args.seconds))
                        cpu_us = cpu * 1e6 / debits if debits else math.nan
                        runs.append(Run(mode, clients, kind, tps, latency, failed, cpu_us))
                        print(
                            f"db_only: synchronous_commit={mode} clients={clients} {kind}: "
                            f"{tps:,.0f} debits/s, {latency:.2f} ms, {failed} failed, "
                            f"PostgreSQL CPU {cpu_us:,.0f} µs/debit",
                            flush=True,
                        )
    except TimeoutError as e:
        print(f"db_only: {e}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)

    print(f"\nPostgreSQL: {facts.version}\n")
    print(
        "| synchronous_commit | clients | spread debits/s | hot debits/s | hot / spread "
        f"| hot, {GROUP} a transaction, debits/s | grouped / hot "
        f"| spread, {GROUP} a transaction, debits/s | grouped / spread "
        "| spread ms | hot ms "
        "| PostgreSQL CPU µs/debit: spread / hot / hot grouped / spread grouped |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    by_key = {(r.synchronous_commit, r.clients, r.kind): r for r in runs}
    for mode in ("on", "off"):
        for clients in args.clients:
            spread, hot = by_key[(mode, clients, "spread")], by_key[(mode, clients, "hot")]
            grouped = by_key[(mode, clients, "hot-grouped")]
            spread_grouped = by_key[(mode, clients, "spread-grouped")]
            print(
                f"| {mode} | {clients} | {spread.tps:,.0f} | {hot.tps:,.0f} "
                f"| {hot.tps / spread.tps:.0%} | {grouped.tps:,.0f} "
                f"| {grouped.tps / hot.tps:.1f}x "
                f"| {spread_grouped.tps:,.0f} | {spread_grouped.tps / spread.tps:.1f}x "
                f"| {spread.latency_ms:.2f} | {hot.latency_ms:.2f} "
                f"| {spread.postgres_us:,.0f} / {hot.postgres_us:,.0f} "
                f"/ {grouped.postgres_us:,.0f} / {spread_grouped.postgres_us:,.0f} |"
            )
    return 1 if any(r.failed for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
