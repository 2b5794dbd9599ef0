"""The load generator of ``bench.metering``: P processes, each a ``grpc.aio`` event loop
with C coroutines calling the raw MeteringService stubs (or Health/Check) in a closed
loop for a fixed time.

The same design as ``bench.load`` (spawned processes, a common start instant, a warm-up
then the measured window, every loop bounded by the window, every RPC by a deadline,
every process by a timeout), with what recording usage needs on top: one call may carry
many events (a batch, or a client stream), each event can fail on its own, so a run
counts calls *and* events, and per-event failures by status code.

An event is counted when the call that carried it completes inside the window and the
server acknowledged that event (its result is OK). A call's latency (p50/p99) runs from
sending it to receiving its response; it is recorded only for calls whose every event
succeeded.
"""

import asyncio
import math
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import READY_TIMEOUT_SECONDS, ProbeFactory, run_processes
from bench.probe import Probe
from tally.v1 import metering_pb2, metering_pb2_grpc

# What one operation sends.
HEALTH = "health"  # grpc.health.v1 Health/Check: no database
UNARY = "unary"  # MeteringService/RecordUsage, one event
BATCH = "batch"  # MeteringService/RecordUsageBatch, `events_per_call` events
STREAM = "stream"  # MeteringService/StreamUsage, `events_per_call` messages
KINDS = (HEALTH, UNARY, BATCH, STREAM)

CONNECT_TIMEOUT_SECONDS = 15.0
ERROR_PAUSE_SECONDS = 0.001
MAX_ERROR_SAMPLES = 5
# A batch of 1,000 results is about 1 MB; leave room.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

ENDPOINTS = ("/v1/pan/verify", "/v2/pan/verify", "/v1/pan/bulk", "/v1/gst/verify")
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Job:
    """What every process of one run does (picklable: sent to spawned processes)."""

    kind: str
    target: str
    accounts: tuple[str, ...]
    product_id: str
    events_per_call: int
    # 1: every event of a call is for one account (the coroutines walk the accounts
    # call by call); n > 1: the events of a call walk n consecutive accounts.
    accounts_per_call: int
    processes: int
    concurrency: int
    warmup_seconds: float
    seconds: float
    rpc_timeout_seconds: float
    event_id_prefix: str
    label: str = ""
    # StreamUsage: events per message (1: the `event` field, one message per event).
    events_per_message: int = 1


# The outcome of one call: events acknowledged, and per-event failures by code.
Outcome = tuple[int, Counter[str]]
# One call of a coroutine: (coroutine index, call number) -> its outcome.
Operation = Callable[[int, int], Awaitable[Outcome]]


@dataclass
class WorkerResult:
    index: int
    latencies: list[float] = field(default_factory=list)
    calls: int = 0  # completed in the window, every event OK
    events: int = 0  # acknowledged in the window
    errors: Counter[str] = field(default_factory=Counter)  # whole calls that failed
    event_errors: Counter[str] = field(default_factory=Counter)  # single events
    error_samples: list[str] = field(default_factory=list)
    # Outside the window too (warm-up and the tail): for the cross-check with the rows.
    events_total: int = 0
    failed_calls_total: int = 0
    cpu_seconds: float = 0.0
    failure: str | None = None


@dataclass
class RunResult:
    job: Job
    calls: int
    events: int
    seconds: float
    latencies: list[float]
    errors: Counter[str]
    event_errors: Counter[str]
    error_samples: list[str]
    events_total: int
    failed_calls_total: int
    failures: list[str]
    load_cores: float
    probe: Probe | None

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the per-call latencies, in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1] * 1000.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + sum(self.event_errors.values())


def _first_account(job: Job, index: int, k: int) -> int:
    """Coroutines start evenly spread over the accounts."""
    slots = job.processes * job.concurrency
    return ((index * job.concurrency + k) * len(job.accounts)) // slots


def _event_accounts(job: Job, index: int, k: int, n: int) -> Callable[[int], str]:
    """The account of the i-th event of call n of coroutine k."""
    accounts = job.accounts
    start = _first_account(job, index, k) + n * job.accounts_per_call
    if job.accounts_per_call <= 1:
        account = accounts[start % len(accounts)]
        return lambda i: account
    per_call = job.accounts_per_call
    return lambda i: accounts[(start + i % per_call) % len(accounts)]


def _failed(results: Any) -> Counter[str]:
    """Per-event failures of a list of UsageResult, by status code name."""
    failed: Counter[str] = Counter()
    for r in results:
        if r.status.code:
            failed[_CODE_NAMES.get(r.status.code, str(r.status.code))] += 1
    return failed


def _operation(job: Job, channel: grpc.aio.Channel, index: int) -> Operation:
    timeout = job.rpc_timeout_seconds
    prefix = f"{job.event_id_prefix}.p{index}"

    if job.kind == HEALTH:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()

        async def noop(k: int, n: int) -> Outcome:
            await health.Check(check, timeout=timeout)
            return 1, Counter()

        return noop

    metering: Any = metering_pb2_grpc.MeteringServiceStub(channel)
    completed = metering_pb2.USAGE_STATUS_COMPLETED

    def fill(event: Any, account: str, event_id: str, i: int) -> None:
        event.account_id = account
        event.event_id = event_id
        event.product_id = job.product_id
        event.endpoint = ENDPOINTS[i % len(ENDPOINTS)]
        event.status = completed
        event.status_code = 200
        event.processing_time_ms = 40 + i % 200

    if job.kind == UNARY:

        async def record(k: int, n: int) -> Outcome:
            request = metering_pb2.RecordUsageRequest()
            fill(request.event, _event_accounts(job, index, k, n)(0), f"{prefix}.c{k}.{n}", n)
            await metering.RecordUsage(request, timeout=timeout)
            return 1, Counter()

        return record

    if job.kind == BATCH:

        async def batch(k: int, n: int) -> Outcome:
            account_of = _event_accounts(job, index, k, n)
            request = metering_pb2.RecordUsageBatchRequest()
            for i in range(job.events_per_call):
                fill(request.events.add(), account_of(i), f"{prefix}.c{k}.{n}.{i}", i)
            reply = await metering.RecordUsageBatch(request, timeout=timeout)
            failed = _failed(reply.results)
            return len(reply.results) - sum(failed.values()), failed

        return batch

    if job.kind == STREAM:

        async def messages(k: int, n: int) -> AsyncIterator[Any]:
            account_of = _event_accounts(job, index, k, n)
            per = job.events_per_message
            for first in range(0, job.events_per_call, per):
                message = metering_pb2.StreamUsageRequest()
                for i in range(first, min(first + per, job.events_per_call)):
                    event = message.event if per == 1 else message.events.add()
                    fill(event, account_of(i), f"{prefix}.c{k}.{n}.{i}", i)
                yield message

        async def stream(k: int, n: int) -> Outcome:
            reply = await metering.StreamUsage(messages(k, n), timeout=timeout)
            failed = _failed(reply.failures)
            # Failures beyond the first 1,000 are only counted.
            failed["(unlisted)"] += reply.failed - len(reply.failures)
            if not failed["(unlisted)"]:
                del failed["(unlisted)"]
            return int(reply.recorded), failed

        return stream

    raise ValueError(f"unknown kind {job.kind!r}")


async def _drive(
    operation: Operation, k: int, window_start: float, window_end: float, result: WorkerResult
) -> None:
    """One closed-loop client: start calls until the window ends."""
    n = 0
    while True:
        started = time.monotonic()
        if started >= window_end:
            return
        error: str | None = None
        ok, failed = 0, Counter[str]()
        try:
            ok, failed = await operation(k, n)
        except grpc.aio.AioRpcError as e:
            error = e.code().name
            if len(result.error_samples) < MAX_ERROR_SAMPLES:
                result.error_samples.append(f"{error}: {e.details()}")
        finished = time.monotonic()
        n += 1
        in_window = window_start <= finished < window_end
        result.events_total += ok
        if error is not None:
            result.failed_calls_total += 1
            if in_window:
                result.errors[error] += 1
            await asyncio.sleep(ERROR_PAUSE_SECONDS)
            continue
        if in_window:
            result.events += ok
            result.event_errors.update(failed)
            if not failed:
                result.calls += 1
                result.latencies.append(finished - started)
        if failed:
            if len(result.error_samples) < MAX_ERROR_SAMPLES:
                result.error_samples.append(f"events failed: {dict(failed)}")
            await asyncio.sleep(ERROR_PAUSE_SECONDS)


async def _cpu_probe(window_start: float, window_end: float, result: WorkerResult) -> None:
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    t0, cpu0 = time.monotonic(), time.process_time()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    t1, cpu1 = time.monotonic(), time.process_time()
    result.cpu_seconds = (cpu1 - cpu0) * (window_end - window_start) / max(t1 - t0, 1e-9)


async def _worker(
    job: Job, index: int, ready: Any, go: Any, start_at: Any, result: WorkerResult
) -> None:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(job.target, options=options) as channel:
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
        limit = job.warmup_seconds + job.seconds + 2 * job.rpc_timeout_seconds + 5
        await asyncio.wait_for(
            asyncio.gather(_cpu_probe(window_start, window_end, result), *drivers), limit
        )


def worker_main(job: Job, index: int, ready: Any, results: Any, go: Any, start_at: Any) -> None:
    """Entry point of one load process."""
    result = WorkerResult(index)
    try:
        asyncio.run(_worker(job, index, ready, go, start_at, result))
    except BaseException:
        result.failure = traceback.format_exc()
        ready.put((index, result.failure))
    results.put(result)


def run(job: Job, probe_factory: ProbeFactory | None = None) -> RunResult:
    """Runs ``job`` in ``job.processes`` fresh processes; returns the merged result."""
    collected, failures, probe = run_processes(
        worker_main, job, f"bench-metering-{job.kind}", probe_factory
    )

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    event_errors: Counter[str] = Counter()
    samples: list[str] = []
    for r in collected:
        latencies.extend(r.latencies)
        errors.update(r.errors)
        event_errors.update(r.event_errors)
        samples.extend(r.error_samples)
        if r.failure:
            failures.append(f"load process {r.index}:\n{r.failure}")
    return RunResult(
        job=job,
        calls=sum(r.calls for r in collected),
        events=sum(r.events for r in collected),
        seconds=job.seconds,
        latencies=latencies,
        errors=errors,
        event_errors=event_errors,
        error_samples=samples[:MAX_ERROR_SAMPLES],
        events_total=sum(r.events_total for r in collected),
        failed_calls_total=sum(r.failed_calls_total for r in collected),
        failures=failures,
        load_cores=sum(r.cpu_seconds for r in collected) / job.seconds,
        probe=probe.result() if probe is not None else None,
    )
