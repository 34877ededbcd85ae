"""``python -m bench``: measure the bridge, the reference and the ceilings in one run.

Every server runs as its own process on this machine against the same local
RabbitMQ; wrk drives the load from another process. All servers are started
first and their points interleaved (every server at one concurrency, then the
next), so that load from elsewhere on the machine hits them alike. A point
counts only if every request got a 2xx and every event reached the broker: a
queue bound with ``#`` to the server's exchange must hold as many messages as
wrk sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq

from bench.broker import QUEUE_TYPES, QUORUM, BrokerProbe, QueueArguments, unique_name
from bench.confirm_loop import ConfirmLoopResult
from bench.load import LoadError, LoadResult, run_wrk, wrk_path
from bench.processes import (
    ServerFailed,
    clean_environment,
    communicate_or_kill,
    cpu_seconds,
    find_broker_pid,
    machine_busy_cores,
    machine_cpu_seconds,
    run_until_terminated,
)
from bench.profiling import ProfilerUnavailable, ProfileSummary, record, summarise_collapsed
from bench.publish_limit import watch_publish_limit
from bench.redis_memory import used_memory
from bench.relay import (
    RelayFailed,
    RelayProcess,
    RelaySummary,
    broker_address,
    start_relay_process,
)
from bench.report import (
    BRIDGE,
    BRIDGE_ARCHIVE,
    BRIDGE_FIXED_LIMIT,
    BRIDGE_REDIS,
    BRIDGE_WORKERS,
    CONFIRM_LOOP,
    HTTP_CEILING,
    LABELS,
    REFERENCE,
    Report,
    Row,
    machine_info,
    median_row,
)
from bench.servers import BRIDGES, ROOT, Launch, UnderTest, WorkersUnsupported, prepare
from bench.signed_requests import RequestFactory, new_secret

DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DEDUP_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SERVERS = (
    BRIDGE,
    BRIDGE_WORKERS,
    BRIDGE_REDIS,
    BRIDGE_ARCHIVE,
    REFERENCE,
    HTTP_CEILING,
    CONFIRM_LOOP,
)
SERVERS = (*DEFAULT_SERVERS, BRIDGE_FIXED_LIMIT)
"""Every server the bench knows; the fixed-limit bridge only when named (--servers)."""
DEFAULT_CONNECTIONS = (1, 16, 64, 256)
PROFILE_CONNECTIONS = 64
CONFIRM_LOOP_IN_FLIGHT = (1, 16, 64)

RATE_GUESS = 15_000.0
"""Requests per second assumed before a server's warm-up has measured it."""
POOL_SAFETY = 1.6
"""Requests generated per point over what the fastest rate seen so far would use."""
BACKGROUND_WARNING = 0.2
"""CPU cores busy, with nothing of this run working, above which results are flagged."""

EXIT_OK, EXIT_FAILED_GATE, EXIT_SETUP, EXIT_TARGETS = 0, 1, 2, 3


@dataclass(frozen=True)
class Plan:
    duration_s: int
    warmup_s: int
    rounds: int
    connections: tuple[int, ...]
    servers: tuple[str, ...]
    max_wrk_threads: int
    amqp_url: str
    dedup_url: str
    """The Redis the bridge-redis row deduplicates in."""
    queue_type: str
    """Of the queue bound to each exchange: every confirm waits for this queue to store."""
    results_dir: Path
    profile: str | None
    """The server to sample with py-spy after the measurements, if any."""
    profile_duration_s: int
    require_targets: bool
    broker_latency_ms: float = 0.0
    """Added each way between the broker and everything measured, by bench/relay.py."""
    queue_arguments: QueueArguments = ()
    """Declared on every counting queue besides its type (``--queue-argument``)."""

    def describe(self) -> dict[str, Any]:
        return {
            "started": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "duration per point": f"{self.duration_s} s",
            "rounds": f"{self.rounds} (each row is the median over rounds)",
            "warm-up per server": f"{self.warmup_s} s at {self.warmup_connections()} connections",
            "connections": ", ".join(map(str, self.connections)),
            "wrk threads": f"min(connections, {self.max_wrk_threads})",
            "servers": ", ".join(self.servers),
            "bound queue": f"one durable {self.queue_type} queue per exchange, binding '#'"
            + "".join(f", {name}={value}" for name, value in self.queue_arguments),
            "broker latency": (
                f"+{self.broker_latency_ms:g} ms each way (bench/relay.py)"
                if self.broker_latency_ms
                else "none (servers connect to the broker directly)"
            ),
        }

    def warmup_connections(self) -> int:
        return 64 if 64 in self.connections else max(self.connections)

    def wrk_threads(self, connections: int) -> int:
        return max(1, min(connections, self.max_wrk_threads))


@dataclass
class Context:
    plan: Plan
    probe: BrokerProbe
    factory: RequestFactory
    launch: Launch
    report: Report
    rate_estimate: dict[str, float] = field(default_factory=dict)
    redis_memory: RedisMemory = field(default_factory=lambda: RedisMemory())


@dataclass
class RedisMemory:
    """Redis's ``used_memory`` before the row's first point, and the ids sent since."""

    before: int | None = None
    ids: int = 0


# --- one point --------------------------------------------------------------------------------


def _pool_size(rate: float, duration_s: int, threads: int) -> int:
    return math.ceil(rate * duration_s * POOL_SAFETY) + 500 * threads


@dataclass(frozen=True)
class Measured:
    result: LoadResult
    peak_rss_mb: float
    server_cpu_s: float
    broker_cpu_s: float | None
    machine_cpu_s: float
    problems: list[str]
    publish_limits: tuple[int, int] | None = None
    """The lowest and highest in-flight limit a bridge reported during the point."""


async def _drive(
    context: Context,
    target: UnderTest,
    connections: int,
    duration_s: int,
    rate: float,
    paced: bool = False,
) -> Measured:
    """One wrk run over freshly signed requests, then the broker-side checks.

    ``paced`` sends at ``rate`` (see :func:`bench.load.run_wrk`) instead of only sizing
    the pool of requests for it.
    """
    threads = context.plan.wrk_threads(connections)
    pool = _pool_size(rate, duration_s, threads)
    server = target.server
    broker = [pid] if (pid := find_broker_pid()) else []
    with tempfile.TemporaryDirectory(prefix="bench-requests-") as directory:
        prefix = Path(directory) / "requests"
        context.factory.write_slices(prefix, pool, threads, server.host_header)
        server.reset_peak_rss()
        limits: list[int] = []
        watcher = (
            asyncio.create_task(watch_publish_limit(f"http://{server.host_header}/metrics", limits))
            if target.key in BRIDGES
            else None
        )
        before = cpu_seconds(server.pids()), cpu_seconds(broker), machine_cpu_seconds()
        try:
            result = await run_wrk(
                server.url,
                connections=connections,
                threads=threads,
                duration_s=duration_s,
                request_prefix=prefix,
                paced_rate=rate if paced else None,
            )
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        after = cpu_seconds(server.pids()), cpu_seconds(broker), machine_cpu_seconds()
        peak_rss = server.peak_rss_mb()
    problems = result.problems()
    probe = context.probe
    reconnects = probe.reconnects
    try:
        if target.counting_queue is not None:
            queued = await probe.settled_count(target.counting_queue, result.issued)
            if queued != result.issued:
                problems.append(f"queue holds {queued} events but wrk sent {result.issued}")
            await probe.purge(target.counting_queue)
        for queue in target.must_stay_empty:
            stray = await probe.message_count(queue)
            if stray:
                problems.append(f"{stray} events in {queue}")
                await probe.purge(queue)
    except (aiormq.exceptions.AMQPError, ConnectionError) as error:
        problems.append(f"could not check the queues: {error!r}")
    if probe.reconnects != reconnects:
        problems.append("the broker closed connections during the point (outside interference)")
    if server.process.poll() is not None:
        problems.append(f"server exited with {server.process.returncode}")
    return Measured(
        result,
        peak_rss,
        server_cpu_s=after[0] - before[0],
        broker_cpu_s=after[1] - before[1] if broker else None,
        machine_cpu_s=after[2] - before[2],
        problems=problems,
        publish_limits=(min(limits), max(limits)) if limits else None,
    )


async def _point(context: Context, target: UnderTest, connections: int) -> Row:
    key = target.key
    duration = context.plan.duration_s
    rate = context.rate_estimate.get(key, RATE_GUESS)
    memory = context.redis_memory
    if key == BRIDGE_REDIS and memory.before is None:
        memory.before = used_memory(context.plan.dedup_url)
    measured = await _drive(context, target, connections, duration, rate)
    if key == BRIDGE_REDIS:
        result = measured.result
        _note_redis_memory(context, connections, result.completed - result.non2xx)
    if measured.result.exhausted_threads:
        # Never wrap around: rerun with a larger pool of fresh ids.
        context.report.notes.append(
            f"{key} at {connections} connections ran out of requests; rerun with a larger pool"
        )
        rate = max(rate, measured.result.rps) * 3
        measured = await _drive(context, target, connections, duration, rate)
        if measured.result.exhausted_threads:
            measured.problems.append("request pool exhausted twice")
    result = measured.result
    context.rate_estimate[key] = max(context.rate_estimate.get(key, 0.0), result.rps)
    seconds = result.duration_s
    return Row(
        server=key,
        connections=connections,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        peak_rss_mb=measured.peak_rss_mb,
        completed=result.completed,
        server_cores=measured.server_cpu_s / seconds,
        broker_cores=(
            measured.broker_cpu_s / seconds if measured.broker_cpu_s is not None else None
        ),
        machine_cores=measured.machine_cpu_s / seconds,
        problems=measured.problems,
        publish_limits=measured.publish_limits,
        detail=asdict(result),
    )


def _note_redis_memory(context: Context, connections: int, accepted: int) -> None:
    """Growth of ``used_memory`` per id since the row began: every request carries a new
    id, each 2xx'd one is remembered, and none expires within the run
    (``REDIS_DEDUP_WINDOW_S``)."""
    memory = context.redis_memory
    memory.ids += accepted
    after = used_memory(context.plan.dedup_url)
    if after is None or memory.before is None or not memory.ids:
        return
    context.report.notes.append(
        f"{BRIDGE_REDIS} up to its point at {connections} connections: Redis's used_memory "
        f"grew by {(after - memory.before) / memory.ids:.1f} bytes per id answered 2xx "
        f"({memory.ids:,} ids; meaningful only with a Redis of the run's own)"
    )


async def _confirm_loop_point(context: Context, in_flight: int) -> Row | None:
    probe = context.probe
    exchange = unique_name("bench.confirm")
    await probe.declare_topic_exchange(exchange)
    queue = await probe.bind_counting_queue(exchange)
    broker = [pid] if (pid := find_broker_pid()) else []
    before = cpu_seconds(broker), machine_cpu_seconds(), time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.confirm_loop",
        "--amqp-url", context.launch.amqp_url, "--exchange", exchange,
        "--concurrency", str(in_flight), "--duration", str(context.plan.duration_s),
        "--warmup", str(min(context.plan.warmup_s, 2)),
        cwd=ROOT, env=clean_environment(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await communicate_or_kill(process)
    # Warm-up included: the loop's phases are not visible from here.
    elapsed = time.monotonic() - before[2]
    broker_cores = (cpu_seconds(broker) - before[0]) / elapsed
    machine_cores = (machine_cpu_seconds() - before[1]) / elapsed
    try:
        result = ConfirmLoopResult(**json.loads(stdout))
    except (ValueError, TypeError):
        context.report.failures.append(
            f"confirm loop ({in_flight} in flight) failed: {stderr.decode(errors='replace')}"
        )
        return None
    reconnects = probe.reconnects
    problems = []
    if result.failures:
        problems.append(f"{result.failures} publishes not confirmed")
    queued = await probe.settled_count(queue, result.published_total)
    if queued != result.published_total:
        problems.append(f"queue holds {queued} but {result.published_total} were published")
    await probe.purge(queue)
    if probe.reconnects != reconnects:
        problems.append("the broker closed connections during the point (outside interference)")
    return Row(
        server=CONFIRM_LOOP,
        connections=in_flight,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        peak_rss_mb=None,
        completed=result.confirmed,
        server_cores=result.cpu_s / result.duration_s,
        broker_cores=broker_cores if broker else None,
        machine_cores=machine_cores,
        problems=problems,
        detail=asdict(result),
    )


async def _warm_up(context: Context, key: str, target: UnderTest) -> None:
    plan = context.plan
    measured = await _drive(context, target, plan.warmup_connections(), plan.warmup_s, RATE_GUESS)
    # A warm-up that ran dry still measured a rate: at least what it got through.
    result = measured.result
    context.rate_estimate[key] = max(result.rps, result.issued / plan.warmup_s)
    if measured.problems:
        context.report.failures.append(f"{key} warm-up: {'; '.join(measured.problems)}")


# --- the schedule -----------------------------------------------------------------------------


def _print_row(row: Row) -> None:
    verdict = "ok" if row.ok else "FAIL: " + "; ".join(row.problems)
    print(
        f"   {LABELS[row.server]:<32} {row.connections:>4}  {row.rps:>8,.0f} req/s  "
        f"p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms  "
        + (f"RSS {row.peak_rss_mb:5.1f} MB  " if row.peak_rss_mb is not None else "")
        + f"CPU {row.server_cores:4.2f}"
        + (f" broker {row.broker_cores:4.2f}" if row.broker_cores is not None else "")
        + f" machine {row.machine_cores:4.2f}  "
        + verdict,
        flush=True,
    )


def _collect(rows: Sequence[Row | None], samples: dict[tuple[str, int], list[Row]]) -> None:
    for row in rows:
        if row is not None:
            _print_row(row)
            samples.setdefault((row.server, row.connections), []).append(row)


async def _start_servers(context: Context) -> list[UnderTest]:
    started = []
    for key in context.plan.servers:
        if key == CONFIRM_LOOP:
            continue
        try:
            target = await prepare(key, context.launch, context.probe)
        except WorkersUnsupported as unsupported:
            context.report.notes.append(str(unsupported))
            print(f"   {LABELS[key]}: skipped: {unsupported}", flush=True)
            continue
        except ServerFailed as failed:
            context.report.failures.append(str(failed))
            print(f"   {LABELS[key]}: FAILED: {failed}", flush=True)
            continue
        if target.processes > 1:
            context.report.notes.append(
                f"{LABELS[key]} ran as {target.processes} processes; its RSS and CPU are sums."
            )
        started.append(target)
    return started


async def _note_background_load(context: Context, when: str) -> None:
    busy = await machine_busy_cores()
    context.report.background[when] = round(busy, 2)
    if busy > BACKGROUND_WARNING:
        message = f"{busy:.2f} cores were busy elsewhere {when}: results are noisy"
        context.report.notes.append(message)
        print(f"   warning: {message}", flush=True)


async def measure(context: Context) -> None:
    plan = context.plan
    print("== starting servers", flush=True)
    targets = await _start_servers(context)
    samples: dict[tuple[str, int], list[Row]] = {}
    try:
        for target in targets:
            await _warm_up(context, target.key, target)
        for round_number in range(1, plan.rounds + 1):
            print(f"\n== round {round_number} of {plan.rounds}", flush=True)
            await _note_background_load(context, f"before round {round_number}")
            in_flight_left = [n for n in CONFIRM_LOOP_IN_FLIGHT if CONFIRM_LOOP in plan.servers]
            for connections in plan.connections:
                rows: list[Row | None] = [
                    await _point(context, target, connections) for target in targets
                ]
                if connections in in_flight_left:
                    # Next to the servers' points at the same concurrency, under the same load.
                    in_flight_left.remove(connections)
                    rows.append(await _confirm_loop_point(context, connections))
                _collect(rows, samples)
            _collect([await _confirm_loop_point(context, n) for n in in_flight_left], samples)
    except (aiormq.exceptions.AMQPError, ConnectionError, LoadError) as error:
        context.report.failures.append(f"measurement stopped: {error!r}")
        print(f"   FAILED: {error!r}", flush=True)
    finally:
        for target in targets:
            code = await target.server.stop()
            if code not in (0, -15):
                context.report.failures.append(f"{target.key} exited with {code} when stopped")
    order = {key: index for index, key in enumerate(SERVERS)}
    for key in sorted(samples, key=lambda k: (order[k[0]], k[1])):
        context.report.rows.append(median_row(samples[key]))


# --- profiling --------------------------------------------------------------------------------


async def profile_server(context: Context, key: str) -> ProfileSummary | None:
    """Sample ``key`` at 64 connections: once as collapsed stacks, once as a flame graph."""
    label = LABELS[key]
    print(f"\n== profiling {label} at {PROFILE_CONNECTIONS} connections (py-spy)", flush=True)
    try:
        target = await prepare(key, context.launch, context.probe)
    except ServerFailed as failed:
        context.report.failures.append(f"profiling: {failed}")
        return None
    results_dir = context.plan.results_dir
    seconds = context.plan.profile_duration_s
    stem = "profile" if key == BRIDGE else f"profile-{key}"
    collapsed = results_dir / f"{stem}.collapsed.txt"
    flame_graph = results_dir / f"{stem}.svg"
    rate_key = f"{key} (profiled)"
    under: list[str] = []
    try:
        await _warm_up(context, rate_key, target)
        for output, output_format in ((collapsed, "raw"), (flame_graph, "flamegraph")):
            # wrk starts first and outlasts the sampling, so only steady load is sampled.
            rate = context.rate_estimate[rate_key]
            load = asyncio.create_task(
                _drive(context, target, PROFILE_CONNECTIONS, seconds + 3, rate)
            )
            await asyncio.sleep(1.5)
            await record(target.server.process.pid, seconds, output, output_format)
            measured = await load
            result = measured.result
            cores = measured.server_cpu_s / result.duration_s
            under.append(f"{result.rps:,.0f} req/s using {cores:.2f} cores")
            print(f"   {output.name}: under {under[-1]}", flush=True)
            if measured.problems:
                context.report.failures.append(f"profiling load: {'; '.join(measured.problems)}")
    except ProfilerUnavailable as unavailable:
        context.report.failures.append(str(unavailable))
        return None
    finally:
        await target.server.stop()
    summary = summarise_collapsed(
        collapsed.read_text(), server=f"{label}, under {under[0]}" if under else label
    )
    summary.files.update({"collapsed stacks": str(collapsed), "flame graph": str(flame_graph)})
    (results_dir / f"{stem}.md").write_text(summary.markdown() + "\n")
    return summary


# --- the run ----------------------------------------------------------------------------------


async def _start_relay(plan: Plan, log_path: Path) -> RelayProcess:
    host, port = broker_address(plan.amqp_url)
    relay = await start_relay_process((host, port), plan.broker_latency_ms, log_path)
    print(
        f"== broker relay on {relay.host}:{relay.port}: "
        f"+{plan.broker_latency_ms:g} ms each way to {host}:{port}",
        flush=True,
    )
    return relay


def _relay_outcome(summary: RelaySummary | None) -> str:
    if summary is None:
        return "; the relay printed no summary (see its log)"
    return (
        f"; {summary.chunks:,} chunks held {summary.mean_hold_ms:.2f} ms on average "
        f"({summary.shortest_hold_ms:.2f} to {summary.longest_hold_ms:.2f}), "
        f"relay CPU {summary.cpu_s or 0:.1f} s"
    )


async def run(plan: Plan) -> int:
    if wrk_path() is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return EXIT_SETUP
    try:
        probe = await BrokerProbe.connect(plan.amqp_url, plan.queue_type, plan.queue_arguments)
    except Exception as error:
        print(f"cannot reach RabbitMQ: {error!r}", file=sys.stderr)
        return EXIT_SETUP
    run_id = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    plan.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = plan.results_dir / "logs"
    relay = None
    if plan.broker_latency_ms:
        try:
            relay = await _start_relay(plan, log_dir / f"relay-{run_id}.log")
        except RelayFailed as failed:
            print(failed, file=sys.stderr)
            await probe.close()
            return EXIT_SETUP
    # The probe stays direct: counting and purging are the harness's, not what is measured.
    servers_amqp_url = plan.amqp_url if relay is None else relay.amqp_url(plan.amqp_url)
    secret = new_secret()
    report = Report(
        machine=machine_info(probe.server_version),
        plan=plan.describe(),
        broker_latency_ms=plan.broker_latency_ms,
    )
    context = Context(
        plan=plan,
        probe=probe,
        factory=RequestFactory(secret),
        launch=Launch(secret, servers_amqp_url, plan.dedup_url, log_dir, run_id),
        report=report,
    )
    started = time.monotonic()
    try:
        if plan.servers:
            await measure(context)
        if plan.profile is not None:
            report.profile = await profile_server(context, plan.profile)
    except LoadError as error:
        report.failures.append(str(error))
    finally:
        await probe.close()
        if relay is not None:
            report.broker_relay = await relay.stop()
    report.plan["elapsed"] = f"{time.monotonic() - started:.0f} s"
    if relay is not None:
        report.plan["broker latency"] += _relay_outcome(report.broker_relay)

    markdown = report.markdown()
    print("\n" + markdown)
    for name in (run_id, "latest"):
        (plan.results_dir / f"{name}.md").write_text(markdown)
        (plan.results_dir / f"{name}.json").write_text(json.dumps(report.as_json(), indent=2))
    print(f"written to {plan.results_dir / run_id}.md and .json", flush=True)
    if not report.valid:
        return EXIT_FAILED_GATE
    if plan.require_targets and any(t.passed is False for t in report.targets()):
        return EXIT_TARGETS
    return EXIT_OK


# --- command line -----------------------------------------------------------------------------


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _milliseconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a delay in milliseconds: {text!r}")
    return value


def _queue_argument(text: str) -> tuple[str, str | int]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("x-") or not value or name == "x-queue-type":
        raise argparse.ArgumentTypeError(
            f"not NAME=VALUE with an x- name other than x-queue-type: {text!r}"
        )
    return name, int(value) if value.isdigit() else value


def _servers(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(SERVERS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown servers {sorted(unknown)}; choose from {SERVERS}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the bridge against a reference implementation and ceilings.",
    )
    parser.add_argument("--quick", action="store_true", help="3 s points, 1 s warm-ups")
    parser.add_argument("--duration", type=int, help="seconds per point (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per server (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every point, report medians (default 1)"
    )
    parser.add_argument(
        "--connections", type=_csv_ints, default=DEFAULT_CONNECTIONS, help="default 1,16,64,256"
    )
    parser.add_argument(
        "--servers",
        type=_servers,
        default=DEFAULT_SERVERS,
        help=f"default {','.join(DEFAULT_SERVERS)}; also {BRIDGE_FIXED_LIMIT}",
    )
    parser.add_argument("--wrk-threads", type=int, default=2, help="most wrk threads (default 2)")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument(
        "--dedup-url", default=DEFAULT_DEDUP_URL, help="Redis for the bridge-redis row"
    )
    parser.add_argument(
        "--dedup-fill",
        action="store_true",
        help="only measure Redis memory per remembered id, filling the Redis at --dedup-url "
        "(one of the run's own) straight through the store's scripts",
    )
    parser.add_argument(
        "--queue-type",
        choices=QUEUE_TYPES,
        default=QUORUM,
        help="of the queue bound to each exchange (default quorum, as recommended for production)",
    )
    parser.add_argument(
        "--queue-argument",
        action="append",
        default=[],
        type=_queue_argument,
        metavar="NAME=VALUE",
        help="also declare every bound queue with this argument, e.g. x-queue-mode=lazy "
        "(repeatable; digits are sent as a number)",
    )
    parser.add_argument(
        "--broker-latency-ms",
        type=_milliseconds,
        default=0.0,
        metavar="MS",
        help="relay the servers' and the confirm loop's broker connections through "
        "bench/relay.py, adding MS each way (default 0: direct)",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    profiled = (BRIDGE, BRIDGE_REDIS, REFERENCE, HTTP_CEILING)
    parser.add_argument(
        "--profile",
        nargs="?",
        const=BRIDGE,
        choices=profiled,
        help="afterwards, sample a server at 64 connections with py-spy (default: bridge)",
    )
    parser.add_argument(
        "--profile-only", nargs="?", const=BRIDGE, choices=profiled, help="only profile"
    )
    parser.add_argument("--profile-duration", type=int, help="seconds sampled (default 10)")
    parser.add_argument("--require-targets", action="store_true", help="exit 3 when a target fails")
    modes = parser.add_argument_group(
        "other modes (bench/instructions.py, bench/soak.py, bench/hydrate.py)"
    )
    modes.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="count the bridge's and the HTTP ceiling's instructions per request over N "
        "requests under callgrind, instead of timing",
    )
    modes.add_argument(
        "--instructions-warmup", type=int, default=200, metavar="N", help="default 200"
    )
    modes.add_argument(
        "--soak",
        metavar="DURATION",
        help="run one bridge at a steady rate for DURATION (90s, 30m, 1h) and watch it drift",
    )
    modes.add_argument(
        "--rate", type=float, help="the soak's requests/s (default: half the measured maximum)"
    )
    modes.add_argument(
        "--soak-interval", type=int, default=20, metavar="SECONDS", help="default 20"
    )
    modes.add_argument(
        "--soak-warmup",
        metavar="DURATION",
        help="left out of the verdicts (default: a quarter of the soak, at most 2 minutes)",
    )
    modes.add_argument("--soak-connections", type=int, default=32, help="default 32")
    modes.add_argument(
        "--hydrate",
        type=int,
        metavar="N",
        help="hydrate N events with one `webhook-bridge hydrate` against the stand-in of "
        "OpenAI's API: objects/s, and the CPU per event beside a plain `consume`'s",
    )
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    quick: bool = args.quick
    return Plan(
        duration_s=args.duration or (3 if quick else 10),
        warmup_s=args.warmup or (1 if quick else 3),
        rounds=max(1, args.rounds),
        connections=args.connections,
        servers=() if args.profile_only else args.servers,
        max_wrk_threads=args.wrk_threads,
        amqp_url=args.amqp_url,
        dedup_url=args.dedup_url,
        queue_type=args.queue_type,
        results_dir=args.results,
        profile=args.profile_only or args.profile,
        profile_duration_s=args.profile_duration or (5 if quick else 10),
        require_targets=args.require_targets,
        broker_latency_ms=args.broker_latency_ms,
        queue_arguments=tuple(args.queue_argument),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    other_mode = args.instructions is not None or args.soak is not None or args.hydrate is not None
    if args.broker_latency_ms and other_mode:
        parser.error("--broker-latency-ms applies to the timed run, not --instructions or --soak")
    if args.queue_argument and other_mode:
        parser.error("--queue-argument applies to the timed run, not --instructions or --soak")
    # Imported here: both modes build on this module's measuring pieces.
    if args.instructions is not None:
        from bench.instructions import run_instructions

        return run_instructions(args.instructions, args.instructions_warmup, args.results)
    if args.hydrate is not None:
        from bench.hydrate import run_hydration

        return run_hydration(args.hydrate, args.amqp_url, args.results)
    if args.dedup_fill:
        from bench.redis_memory import run_fill

        return run_fill(args.dedup_url)
    if args.soak is not None:
        from bench.soak import run_soak, soak_plan_from

        return run_soak(soak_plan_from(args, parser))
    plan = plan_from(args)
    return run_until_terminated(run(plan))
