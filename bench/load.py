"""The load generator: P processes, each a ``grpc.aio`` event loop with C coroutines
that call the raw generated stubs in a closed loop for a fixed time.

Every process opens one channel to the server (loopback only), builds its requests,
reports ready, and waits for a common start instant. Each run has a warm-up (not
recorded) followed by the measured window; an operation counts when it *completes*
inside the window, and its latency is the time from sending its first RPC to receiving
its last reply. Every loop is bounded by the window, every RPC by a deadline, and every
process by a timeout after which it is killed.
"""

import asyncio
import contextlib
import math
import multiprocessing
import queue
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.probe import Probe, WindowProbe
from tally.v1 import credits_pb2, credits_pb2_grpc

# One operation of a coroutine: (coroutine index, operation number) -> awaitable.
Operation = Callable[[int, int], Awaitable[None]]

NOOP = "noop"
BALANCE = "balance"
PAIR = "pair"
PAIR_HOT = "pair-hot"
DEBIT = "debit"
DEBIT_HOT = "debit-hot"
KINDS = (NOOP, BALANCE, PAIR, PAIR_HOT, DEBIT, DEBIT_HOT)
HOT_KINDS = (PAIR_HOT, DEBIT_HOT)

# Bounds on the phases outside the measured window.
CONNECT_TIMEOUT_SECONDS = 15.0
READY_TIMEOUT_SECONDS = 60.0
START_DELAY_SECONDS = 0.25
ERROR_PAUSE_SECONDS = 0.001


@dataclass(frozen=True)
class Job:
    """What every process of one run does (picklable: sent to spawned processes)."""

    kind: str
    target: str
    accounts: tuple[str, ...]
    amount: str
    processes: int
    concurrency: int
    warmup_seconds: float
    seconds: float
    rpc_timeout_seconds: float
    request_id_prefix: str


@dataclass
class WorkerResult:
    index: int
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    # Outside the window too (warm-up and the tail): for cross-checks with the ledger.
    ok_total: int = 0
    errors_total: int = 0
    # CPU seconds this process used during the window.
    cpu_seconds: float = 0.0
    failure: str | None = None


@dataclass
class RunResult:
    job: Job
    ops: int
    seconds: float
    latencies: list[float]
    errors: Counter[str]
    error_samples: list[str]
    ok_total: int
    errors_total: int
    failures: list[str]
    # Cores the load processes kept busy during the window, and the server-side probe.
    load_cores: float
    probe: Probe | None

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the per-operation latencies, in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1] * 1000.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _operation(job: Job, channel: grpc.aio.Channel, index: int) -> Operation:
    """The operation of ``job.kind``, with everything that can be built in advance."""
    timeout = job.rpc_timeout_seconds
    slots = job.processes * job.concurrency
    n_accounts = len(job.accounts)

    def first_account(k: int) -> int:
        # Coroutines start evenly spread over the accounts and walk them in order.
        return ((index * job.concurrency + k) * n_accounts) // slots

    if job.kind == NOOP:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()

        async def noop(k: int, n: int) -> None:
            await health.Check(check, timeout=timeout)

        return noop

    credits: Any = credits_pb2_grpc.CreditsServiceStub(channel)
    prefix = f"{job.request_id_prefix}.p{index}"

    if job.kind == BALANCE:
        requests = [credits_pb2.GetBalanceRequest(account_id=a) for a in job.accounts]

        async def balance(k: int, n: int) -> None:
            await credits.GetBalance(requests[(first_account(k) + n) % n_accounts], timeout=timeout)

        return balance

    if job.kind in (PAIR, PAIR_HOT):

        async def pair(k: int, n: int) -> None:
            account = job.accounts[(first_account(k) + n) % n_accounts]
            reply = await credits.Reserve(
                credits_pb2.ReserveRequest(
                    request_id=f"{prefix}.c{k}.{n}.r", account_id=account, amount=job.amount
                ),
                timeout=timeout,
            )
            await credits.Capture(
                credits_pb2.CaptureRequest(
                    request_id=f"{prefix}.c{k}.{n}.c",
                    reservation_id=reply.reservation.reservation_id,
                ),
                timeout=timeout,
            )

        return pair

    if job.kind in (DEBIT, DEBIT_HOT):

        async def debit(k: int, n: int) -> None:
            await credits.Debit(
                credits_pb2.DebitRequest(
                    request_id=f"{prefix}.c{k}.{n}.d",
                    account_id=job.accounts[(first_account(k) + n) % n_accounts],
                    amount=job.amount,
                ),
                timeout=timeout,
            )

        return debit

    raise ValueError(f"unknown kind {job.kind!r}")


async def _drive(
    operation: Operation, k: int, window_start: float, window_end: float, result: WorkerResult
) -> None:
    """One closed-loop client: start operations until the window ends."""
    n = 0
    while True:
        started = time.monotonic()
        if started >= window_end:
            return
        error: str | None = None
        try:
            await operation(k, n)
        except grpc.aio.AioRpcError as e:
            error = e.code().name
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{error}: {e.details()}")
        finished = time.monotonic()
        n += 1
        if error is None:
            result.ok_total += 1
            if window_start <= finished < window_end:
                result.latencies.append(finished - started)
        else:
            result.errors_total += 1
            if window_start <= finished < window_end:
                result.errors[error] += 1
            # Never spin on an error that comes back at once.
            await asyncio.sleep(ERROR_PAUSE_SECONDS)


async def _worker(
    job: Job, index: int, ready: Any, go: Any, start_at: Any, result: WorkerResult
) -> None:
    async with grpc.aio.insecure_channel(job.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_SECONDS)
        operation = _operation(job, channel, index)
        ready.put((index, None))
        wait_until = time.monotonic() + READY_TIMEOUT_SECONDS
        while not go.is_set():
            if time.monotonic() > wait_until:
                raise TimeoutError("no start signal")
            await asyncio.sleep(0.005)
        start = float(start_at.value)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        window_start = start + job.warmup_seconds
        window_end = window_start + job.seconds
        drivers = [
            _drive(operation, k, window_start, window_end, result) for k in range(job.concurrency)
        ]
        # Bounded even if an RPC ignored its deadline.
        limit = job.warmup_seconds + job.seconds + 2 * job.rpc_timeout_seconds + 5
        await asyncio.wait_for(
            asyncio.gather(_cpu_probe(window_start, window_end, result), *drivers), limit
        )


async def _cpu_probe(window_start: float, window_end: float, result: WorkerResult) -> None:
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    t0, cpu0 = time.monotonic(), time.process_time()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    t1, cpu1 = time.monotonic(), time.process_time()
    # Scaled to the window, in case the loop woke late.
    result.cpu_seconds = (cpu1 - cpu0) * (window_end - window_start) / max(t1 - t0, 1e-9)


def worker_main(job: Job, index: int, ready: Any, results: Any, go: Any, start_at: Any) -> None:
    """Entry point of one load process."""
    result = WorkerResult(index)
    try:
        asyncio.run(_worker(job, index, ready, go, start_at, result))
    except BaseException:
        result.failure = traceback.format_exc()
        ready.put((index, result.failure))
    results.put(result)


ProbeFactory = Callable[[float, float], WindowProbe]


def run_processes(
    target: Callable[..., None],
    job: Any,
    name: str,
    probe_factory: ProbeFactory | None = None,
) -> tuple[list[Any], list[str], WindowProbe | None]:
    """Runs ``target(job, index, ready, results, go, start_at)`` in ``job.processes``
    fresh processes started together; returns what they reported, the failures, and the
    probe. ``job`` needs ``processes``, ``warmup_seconds``, ``seconds`` and
    ``rpc_timeout_seconds``.

    ``probe_factory(window_start, window_end)``, if given, makes a probe of the server
    side that is started with the run and read after it."""
    # spawn, not fork: the parent has live gRPC channels, which do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    results = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    processes = [
        ctx.Process(
            target=target,
            args=(job, i, ready, results, go, start_at),
            name=f"{name}-{i}",
            daemon=True,
        )
        for i in range(job.processes)
    ]
    failures: list[str] = []
    collected: list[Any] = []
    probe: WindowProbe | None = None
    started: list[Any] = []
    try:
        for p in processes:
            p.start()
            started.append(p)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for _ in processes:
            index, failure = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            if failure:
                raise RuntimeError(f"load process {index} failed to start:\n{failure}")
        # CLOCK_MONOTONIC is system-wide on Linux, so one instant serves every process.
        start = time.monotonic() + START_DELAY_SECONDS
        start_at.value = start
        if probe_factory is not None:
            window_start = start + job.warmup_seconds
            probe = probe_factory(window_start, window_start + job.seconds)
            probe.start()
        go.set()
        limit = START_DELAY_SECONDS + job.warmup_seconds + job.seconds
        deadline = time.monotonic() + limit + 2 * job.rpc_timeout_seconds + 30
        for _ in processes:
            collected.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
    except queue.Empty:
        failures.append("a load process did not report in time")
    finally:
        # After a failure (or an interruption) stop the processes at once.
        grace = 10.0 if len(collected) == len(processes) else 0.0
        for p in started:
            p.join(grace)
        for p in started:
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in (ready, results):
            with contextlib.suppress(Exception):
                q.close()
                q.cancel_join_thread()
    return collected, failures, probe


def run(job: Job, probe_factory: ProbeFactory | None = None) -> RunResult:
    """Runs ``job`` in ``job.processes`` fresh processes; returns the merged result."""
    collected, failures, probe = run_processes(worker_main, job, f"bench-{job.kind}", probe_factory)

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    for r in collected:
        latencies.extend(r.latencies)
        errors.update(r.errors)
        samples.extend(r.error_samples)
        if r.failure:
            failures.append(f"load process {r.index}:\n{r.failure}")
    return RunResult(
        job=job,
        ops=len(latencies),
        seconds=job.seconds,
        latencies=latencies,
        errors=errors,
        error_samples=samples[:5],
        ok_total=sum(r.ok_total for r in collected),
        errors_total=sum(r.errors_total for r in collected),
        failures=failures,
        load_cores=sum(r.cpu_seconds for r in collected) / job.seconds,
        probe=probe.result() if probe is not None else None,
    )
