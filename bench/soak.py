"""``python -m bench --soak DURATION``: one bridge at a steady rate, watched for drift.

One bridge process (the defaults: in-process deduplication with its 600 s window
and 100,000-id bound, metrics) is started through ``bench.task_probe``, which counts
its asyncio tasks. Unless ``--rate`` is given, a 10 s unpaced wrk run at 64
connections measures its maximum and the soak runs at half of it. The load is a
sequence of paced wrk intervals (``bench/wrk_paced.lua``) over freshly signed
webhooks, each one checked like every benchmark point: every request a 2xx, every
event in the counting queue. Prometheus is stood in for by a scrape of ``/metrics``
every 5 s; at the end the bridge's published count must equal what wrk sent.

Every second the harness samples the bridge's RSS and open descriptors (from
``/proc``) and its task count; each interval records the median RSS, the most
descriptors and tasks under load, the descriptors and tasks left once wrk has
closed its connections (what stays is what leaks) and wrk's latency percentiles.
The warm-up, left out of the
verdicts, lasts until the deduplication store is full (it grows by design until
then) plus a minute. After it, the first and last quarters of the intervals are
compared: RSS may drift under 5 %, descriptors and tasks may not grow by more than
2, the p99 may not rise by more than half, and every interval must reach 90 % of
the target rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.broker import BrokerProbe
from bench.load import LoadError, wrk_path
from bench.processes import Server, ServerFailed, run_until_terminated
from bench.report import BRIDGE, Report, Target, machine_info
from bench.results import write_results
from bench.run import RATE_GUESS, Context, Measured, Plan, _drive
from bench.servers import Launch, UnderTest, prepare
from bench.signed_requests import RequestFactory, new_secret
from bench.task_probe import PROBE_INTERVAL_S
from bridge.settings import load_settings

MAX_RATE_CONNECTIONS = 64
MAX_RATE_SECONDS = 10
SAMPLE_EVERY_S = 1.0
AT_REST_SETTLE_S = 2 * PROBE_INTERVAL_S + 0.1
SCRAPE_EVERY_S = 5.0
RSS_DRIFT_LIMIT = 0.05
COUNT_GROWTH_ALLOWANCE = 2
P99_RISE_LIMIT = 1.5
WARMUP_AFTER_FILL_S = 60
RATE_SHORTFALL_LIMIT = 0.9
"""An interval below 90 % of the target rate did not hold the rate."""
_DURATION = re.compile(r"(\d+)([smh]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``30m`` or ``1h``."""
    matched = _DURATION.fullmatch(text.strip())
    if matched is None or int(matched.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)")
    return int(matched.group(1)) * _UNIT_SECONDS[matched.group(2)]


@dataclass(frozen=True)
class SoakPlan:
    duration_s: int
    rate: float | None
    """Requests per second; ``None``: half of the maximum measured first."""
    interval_s: int
    warmup_s: int | None
    """Left out of the verdicts; ``None``: until the deduplication store is full, plus a minute."""
    connections: int
    max_wrk_threads: int
    amqp_url: str
    queue_type: str
    results_dir: Path

    def describe(self) -> dict[str, Any]:
        return {
            "duration": f"{self.duration_s} s",
            "rate": f"{self.rate:g} req/s" if self.rate else "half of the measured maximum",
            "interval": f"{self.interval_s} s",
            "warm-up (excluded from the verdicts)": (
                "the deduplication store's fill time plus 60 s"
                if self.warmup_s is None
                else f"{self.warmup_s} s"
            ),
            "connections": self.connections,
            "bound queue": f"one durable {self.queue_type} queue, binding '#'",
        }


@dataclass(frozen=True)
class Interval:
    ended_s: float
    """Since the soak's start."""
    target_rate: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_mb: float
    peak_rss_mb: float
    open_descriptors: int
    """Once wrk has stopped and every connection is closed: what stays open is what leaks."""
    tasks: int | None
    """Likewise, at rest; ``None`` when the probe could not be read."""
    descriptors_max: int
    """The most sampled under load."""
    tasks_max: int | None
    server_cores: float
    problems: list[str]


@dataclass
class SoakReport:
    run_id: str
    started: str
    machine: dict[str, str]
    plan: dict[str, Any]
    max_rate: float | None = None
    target_rate: float = 0.0
    warmup_s: int = 0
    intervals: list[Interval] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    scrapes: int = 0

    def steady(self) -> list[Interval]:
        return [interval for interval in self.intervals if interval.ended_s > self.warmup_s]

    def verdicts(self) -> list[Target]:
        steady = self.steady()
        if len(steady) < 2:
            return [Target("at least two intervals after the warm-up", False, f"{len(steady)}")]
        quarter = max(1, len(steady) // 4)
        first, last = steady[:quarter], steady[-quarter:]

        def medians(value: Callable[[Interval], float | None]) -> tuple[float, float] | None:
            early = [v for v in map(value, first) if v is not None]
            late = [v for v in map(value, last) if v is not None]
            if not early or not late:
                return None
            return statistics.median(early), statistics.median(late)

        verdicts = []
        rss = medians(lambda interval: interval.rss_mb)
        assert rss is not None
        drift = (rss[1] - rss[0]) / rss[0]
        verdicts.append(
            Target(
                f"RSS drift after warm-up < {RSS_DRIFT_LIMIT:.0%}",
                abs(drift) < RSS_DRIFT_LIMIT,
                f"{rss[0]:.1f} MB -> {rss[1]:.1f} MB ({drift:+.1%})",
            )
        )
        for name, value in (
            ("open descriptors", lambda interval: interval.open_descriptors),
            ("asyncio tasks", lambda interval: interval.tasks),
        ):
            compared = medians(value)
            if compared is None:
                verdicts.append(Target(f"no growth in {name}", None, "not sampled"))
                continue
            verdicts.append(
                Target(
                    f"no growth in {name} (at most +{COUNT_GROWTH_ALLOWANCE})",
                    compared[1] <= compared[0] + COUNT_GROWTH_ALLOWANCE,
                    f"at rest {compared[0]:g} -> {compared[1]:g} (medians over the quarters)",
                )
            )
        p99 = medians(lambda interval: interval.p99_ms)
        assert p99 is not None
        verdicts.append(
            Target(
                f"p99 flat (last quarter at most {P99_RISE_LIMIT:g}x the first)",
                p99[1] <= p99[0] * P99_RISE_LIMIT,
                f"median {p99[0]:.2f} ms -> {p99[1]:.2f} ms; worst interval "
                f"{max(interval.p99_ms for interval in steady):.2f} ms",
            )
        )
        slowest = min(interval.rps for interval in steady)
        verdicts.append(
            Target(
                f"rate held (every interval >= {RATE_SHORTFALL_LIMIT:.0%} of the target)",
                slowest >= self.target_rate * RATE_SHORTFALL_LIMIT,
                f"target {self.target_rate:,.0f} req/s, slowest interval {slowest:,.0f}",
            )
        )
        return verdicts

    @property
    def passed(self) -> bool:
        return (
            not self.failures
            and all(not interval.problems for interval in self.intervals)
            and all(verdict.passed is not False for verdict in self.verdicts())
        )

    def markdown(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        maximum = f"{self.max_rate:,.0f} req/s measured" if self.max_rate else "not measured"
        lines = [
            "# openai-webhook-bridge soak",
            "",
            f"Run: {self.started}, {status}. Maximum: {maximum}; "
            f"target {self.target_rate:,.0f} req/s; {self.scrapes} scrapes of /metrics.",
            "",
            "| verdict | result | detail |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {v.name} | {v.verdict} | {v.detail} |" for v in self.verdicts()]
        lines += [
            "",
            "| at (s) | req/s | p50 ms | p99 ms | max ms | RSS MB | peak RSS MB "
            "| fds (at rest/most) | tasks (at rest/most) | CPU | gate |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for interval in self.intervals:
            tasks = "n/a" if interval.tasks is None else f"{interval.tasks}/{interval.tasks_max}"
            marker = " (warm-up)" if interval.ended_s <= self.warmup_s else ""
            lines.append(
                f"| {interval.ended_s:.0f}{marker} | {interval.rps:,.0f} | {interval.p50_ms:.2f} "
                f"| {interval.p99_ms:.2f} | {interval.max_ms:.1f} | {interval.rss_mb:.1f} "
                f"| {interval.peak_rss_mb:.1f} "
                f"| {interval.open_descriptors}/{interval.descriptors_max} | {tasks} "
                f"| {interval.server_cores:.2f} | {'; '.join(interval.problems) or 'ok'} |"
            )
        if self.failures:
            lines += ["", "## Failures", ""] + [f"- {failure}" for failure in self.failures]
        lines += ["", "## Plan", ""] + [f"- {k}: {v}" for k, v in self.plan.items()]
        lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in self.machine.items()]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "machine": self.machine,
            "plan": self.plan,
            "max_rate": self.max_rate,
            "target_rate": self.target_rate,
            "warmup_s": self.warmup_s,
            "passed": self.passed,
            "verdicts": [asdict(verdict) for verdict in self.verdicts()],
            "intervals": [asdict(interval) for interval in self.intervals],
            "failures": self.failures,
            "scrapes": self.scrapes,
        }


@dataclass
class Samples:
    rss_mb: list[float] = field(default_factory=list)
    descriptors: list[int] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)


def _read_tasks(probe_file: Path) -> int | None:
    try:
        count: int = json.loads(probe_file.read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return None
    return count


async def _sample(
    server: Server, probe_file: Path, into: Samples, status: Callable[[], str]
) -> None:
    on_terminal = sys.stdout.isatty()
    while True:
        into.rss_mb.append(server.rss_mb())
        into.descriptors.append(server.open_descriptors())
        tasks = _read_tasks(probe_file)
        if tasks is not None:
            into.tasks.append(tasks)
        if on_terminal:
            print(
                f"\r   {status()}  RSS {into.rss_mb[-1]:5.1f} MB  fds {into.descriptors[-1]}  "
                f"tasks {tasks if tasks is not None else '?'}   ",
                end="",
                flush=True,
            )
        await asyncio.sleep(SAMPLE_EVERY_S)


async def _scrape(url: str, report: SoakReport, latest: list[str]) -> None:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(url) as response:
                    text = await response.text()
                    if response.status != 200:
                        report.failures.append(f"/metrics answered {response.status}")
                        return
                    latest[:] = [text]
                    report.scrapes += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                report.failures.append(f"/metrics scrape failed: {error!r}")
                return
            await asyncio.sleep(SCRAPE_EVERY_S)


def _published_count(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "webhook_bridge_requests":
            return sum(
                sample.value
                for sample in family.samples
                if sample.name == "webhook_bridge_requests_total"
                and sample.labels.get("outcome") == "published"
            )
    return 0.0


async def _fetch(url: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as response,
    ):
        return await response.text()


class Soak:
    def __init__(self, plan: SoakPlan, context: Context, target: UnderTest, probe_file: Path):
        self.plan = plan
        self.context = context
        self.target = target
        self.probe_file = probe_file
        self.dedup_bound = DeduplicationBound.of_defaults(context.launch.secret)
        self.issued = 0

    async def drive(self, connections: int, seconds: int, rate: float, *, paced: bool) -> Measured:
        measured = await _drive(self.context, self.target, connections, seconds, rate, paced)
        self.issued += measured.result.issued
        return measured

    async def interval(self, started: float, rate: float) -> Interval:
        samples = Samples()

        def elapsed() -> str:
            return f"[{time.monotonic() - started:6.0f} s]"

        sampler = asyncio.create_task(
            _sample(self.target.server, self.probe_file, samples, elapsed)
        )
        try:
            measured = await self.drive(
                self.plan.connections, self.plan.interval_s, rate, paced=True
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        # wrk has closed its connections; let the bridge see it and the probe write again.
        await asyncio.sleep(AT_REST_SETTLE_S)
        result = measured.result
        return Interval(
            ended_s=round(time.monotonic() - started, 1),
            target_rate=rate,
            rps=result.rps,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            max_ms=result.max_ms,
            rss_mb=statistics.median(samples.rss_mb) if samples.rss_mb else 0.0,
            peak_rss_mb=measured.peak_rss_mb,
            open_descriptors=self.target.server.open_descriptors(),
            tasks=_read_tasks(self.probe_file),
            descriptors_max=max(samples.descriptors, default=0),
            tasks_max=max(samples.tasks, default=None),
            server_cores=measured.server_cpu_s / result.duration_s,
            problems=measured.problems,
        )


def _print_interval(interval: Interval, warmup_s: int) -> None:
    phase = "warm-up" if interval.ended_s <= warmup_s else "steady "
    tasks = "?" if interval.tasks is None else f"{interval.tasks}"
    print(
        f"\r   [{interval.ended_s:6.0f} s] {phase} {interval.rps:8,.0f} req/s  "
        f"p50 {interval.p50_ms:6.2f} ms  p99 {interval.p99_ms:6.2f} ms  "
        f"RSS {interval.rss_mb:5.1f} MB  at rest: fds {interval.open_descriptors} tasks {tasks}  "
        + ("; ".join(interval.problems) or "ok"),
        flush=True,
    )


async def soak(plan: SoakPlan) -> SoakReport:
    """Run the soak; raises :class:`ServerFailed` or :class:`LoadError` on set-up failures."""
    started_at = datetime.now(tz=UTC)
    run_id = f"{started_at:%Y%m%dT%H%M%SZ}"
    probe = await BrokerProbe.connect(plan.amqp_url, plan.queue_type)
    report = SoakReport(
        run_id=run_id,
        started=f"{started_at:%Y-%m-%d %H:%M:%S UTC}",
        machine=machine_info(probe.server_version),
        plan=plan.describe(),
    )
    log_dir = plan.results_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    probe_file = log_dir / f"soak-{run_id}.tasks.json"
    secret = new_secret()
    launch = Launch(
        secret,
        plan.amqp_url,
        "",
        log_dir,
        f"soak-{run_id}",
        bridge_command=(sys.executable, "-m", "bench.task_probe", "--probe-file", str(probe_file)),
    )
    bench_plan = Plan(
        duration_s=plan.interval_s,
        warmup_s=0,
        rounds=1,
        connections=(plan.connections,),
        servers=(BRIDGE,),
        max_wrk_threads=plan.max_wrk_threads,
        amqp_url=plan.amqp_url,
        dedup_url="",
        queue_type=plan.queue_type,
        results_dir=plan.results_dir,
        profile=None,
        profile_duration_s=0,
        require_targets=False,
    )
    try:
        target = await prepare(BRIDGE, launch, probe)
        context = Context(
            bench_plan, probe, RequestFactory(secret), launch, Report(report.machine, {})
        )
        runner = Soak(plan, context, target, probe_file)
        try:
            await _run_intervals(plan, report, runner)
            metrics_url = f"http://{target.server.host_header}/metrics"
            published = _published_count(await _fetch(metrics_url))
            if published != runner.issued:
                report.failures.append(
                    f"the bridge counted {published:.0f} published, wrk sent {runner.issued}"
                )
        finally:
            code = await target.server.stop()
            if code not in (0, -15):
                report.failures.append(f"the bridge exited with {code} when stopped")
    finally:
        await probe.close()
    return report


async def _run_intervals(plan: SoakPlan, report: SoakReport, runner: Soak) -> None:
    if plan.rate is None:
        print(f"== maximum: {MAX_RATE_SECONDS} s at {MAX_RATE_CONNECTIONS} connections", flush=True)
        measured = await runner.drive(
            MAX_RATE_CONNECTIONS, MAX_RATE_SECONDS, RATE_GUESS, paced=False
        )
        if measured.problems:
            report.failures.append(f"maximum-rate run: {'; '.join(measured.problems)}")
        report.max_rate = measured.result.rps
        print(f"   {report.max_rate:,.0f} req/s", flush=True)
    report.target_rate = plan.rate or (report.max_rate or 0.0) / 2
    if report.target_rate <= 0:
        report.failures.append("no rate to soak at")
        return
    report.warmup_s = (
        plan.warmup_s
        if plan.warmup_s is not None
        else warmup_until_deduplication_full(runner.dedup_bound, report.target_rate)
    )
    print(
        f"== soak: {plan.duration_s} s at {report.target_rate:,.0f} req/s over "
        f"{plan.connections} connections ({report.warmup_s} s warm-up)",
        flush=True,
    )
    scraped: list[str] = []
    scraper = asyncio.create_task(
        _scrape(f"http://{runner.target.server.host_header}/metrics", report, scraped)
    )
    started = time.monotonic()
    try:
        while time.monotonic() - started < plan.duration_s:
            interval = await runner.interval(started, report.target_rate)
            report.intervals.append(interval)
            _print_interval(interval, report.warmup_s)
    finally:
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper


def run_soak(plan: SoakPlan) -> int:
    if wrk_path() is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return EXIT_SETUP
    try:
        report = run_until_terminated(soak(plan))
    except (ServerFailed, LoadError, ConnectionError, OSError) as error:
        print(f"soak could not run: {error}", file=sys.stderr)
        return EXIT_SETUP
    path = write_results(
        plan.results_dir, "soak", report.run_id, report.markdown(), report.as_json()
    )
    print("\n" + report.markdown())
    print(f"written to {path} and .json", flush=True)
    return EXIT_OK if report.passed else EXIT_FAILED


def warmup_until_deduplication_full(bound: DeduplicationBound, rate: float) -> int:
    """Until the in-process store holds all it ever will (its id bound or its window's
    worth, whichever comes first), plus a minute: its growth until then is by design."""
    fill_s = min(bound.window_s, bound.max_ids / rate)
    return math.ceil(fill_s) + WARMUP_AFTER_FILL_S


@dataclass(frozen=True)
class DeduplicationBound:
    window_s: float
    max_ids: int

    @classmethod
    def of_defaults(cls, secret: str) -> DeduplicationBound:
        """The bound of a bridge started with only its secret, as the soak starts it."""
        settings = load_settings(secrets_dir=Path("/nonexistent"), webhook_secret=secret)
        return cls(settings.dedup_window_seconds, settings.dedup_max_ids)


def soak_plan_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SoakPlan:
    """The soak's plan from ``python -m bench``'s arguments (see ``bench.run.build_parser``)."""
    try:
        duration = parse_duration(args.soak)
        warmup = None if args.soak_warmup is None else parse_duration(args.soak_warmup)
    except ValueError as error:
        parser.error(str(error))
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    return SoakPlan(
        duration_s=duration,
        rate=args.rate,
        interval_s=args.soak_interval,
        warmup_s=warmup,
        connections=args.soak_connections,
        max_wrk_threads=args.wrk_threads,
        amqp_url=args.amqp_url,
        queue_type=args.queue_type,
        results_dir=args.results,
    )
