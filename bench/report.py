"""The results table, the ratios between servers, and the targets the bridge must meet."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import wrk_path
from bench.profiling import ProfileSummary
from bench.relay import RelaySummary

BRIDGE = "bridge"
BRIDGE_WORKERS = "bridge-workers2"
BRIDGE_REDIS = "bridge-redis"
BRIDGE_ARCHIVE = "bridge-archive"
BRIDGE_FIXED_LIMIT = "bridge-fixed32"
REFERENCE = "reference"
HTTP_CEILING = "http-ceiling"
CONFIRM_LOOP = "confirm-loop"

LABELS = {
    BRIDGE: "bridge (defaults)",
    BRIDGE_WORKERS: "bridge (BRIDGE_WORKERS=2)",
    BRIDGE_REDIS: "bridge (dedup in Redis)",
    BRIDGE_ARCHIVE: "bridge (archive stream on)",
    BRIDGE_FIXED_LIMIT: "bridge (fixed in-flight limit 32)",
    REFERENCE: "reference (bench/reference.py)",
    HTTP_CEILING: "HTTP ceiling (read body, 200)",
    CONFIRM_LOOP: "confirm loop (aiormq, no HTTP)",
}

THROUGHPUT_RATIO_TARGET = 2.0
CPU_PER_REQUEST_RATIO_TARGET = 3.0
"""The most the bridge's CPU per request may be, as a multiple of aiohttp's alone."""
LATENCY_OVER_FLOOR_TARGET_MS = 0.3
PEAK_RSS_TARGET_MB = 100.0
THROUGHPUT_CONNECTIONS = 64
REDIS_DEDUP_RATIO_TARGET = 0.8

_PACKAGES = (
    "aiohttp",
    "aio-pika",
    "aiormq",
    "pydantic",
    "pydantic-core",
    "uvloop",
    "standardwebhooks",
)


@dataclass
class Row:
    server: str
    connections: int
    """Concurrent connections for wrk rows; publishes in flight for the confirm loop."""
    rps: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float | None
    completed: int
    server_cores: float
    """CPU time of the server's processes (or the confirm loop's) per second of the point."""
    broker_cores: float | None
    """The same for the RabbitMQ node, when it runs on this machine."""
    machine_cores: float
    """The same for the whole machine: what is left after the server and the broker is wrk,
    the harness and anything else running."""
    problems: list[str] = field(default_factory=list)
    publish_limits: tuple[int, int] | None = None
    """For bridge rows: the lowest and highest adaptive in-flight limit seen in the point."""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def cpu_us_per_request(self) -> float | None:
        """The server's CPU time per answered request, kernel time included."""
        return self.server_cores / self.rps * 1e6 if self.rps else None


@dataclass(frozen=True)
class Target:
    name: str
    passed: bool | None
    """None when the rows it needs were not measured."""
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


@dataclass
class Report:
    machine: dict[str, str]
    plan: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Problems outside any row (warm-up, a server that would not start)."""
    notes: list[str] = field(default_factory=list)
    background: dict[str, float] = field(default_factory=dict)
    """Cores busy for a second before each round, while the run itself idled."""
    profile: ProfileSummary | None = None
    broker_latency_ms: float = 0.0
    """Added by bench/relay.py to each direction between the servers and the broker."""
    broker_relay: RelaySummary | None = None
    """What the relay did, when there was one."""

    @property
    def valid(self) -> bool:
        return not self.failures and all(row.ok for row in self.rows)

    def row(self, server: str, connections: int) -> Row | None:
        for row in self.rows:
            if row.server == server and row.connections == connections:
                return row
        return None

    def server_rows(self, server: str) -> list[Row]:
        return [row for row in self.rows if row.server == server]

    def targets(self) -> list[Target]:
        return [
            self._throughput_target(),
            self._cpu_per_request_target(),
            self._p99_target(),
            self._floor_target(),
            self._rss_target(),
            self._redis_dedup_target(),
        ]

    def _throughput_target(self) -> Target:
        name = (
            f"throughput at {THROUGHPUT_CONNECTIONS} connections >= "
            f"{THROUGHPUT_RATIO_TARGET:g}x reference"
        )
        compared = self._throughput_ratio(BRIDGE, REFERENCE)
        if compared is None:
            return Target(name, None, "needs bridge and reference at 64 connections")
        detail, ratio = compared
        return Target(name, ratio >= THROUGHPUT_RATIO_TARGET, detail)

    def _cpu_per_request_target(self) -> Target:
        name = (
            f"CPU per request at {THROUGHPUT_CONNECTIONS} connections <= "
            f"{CPU_PER_REQUEST_RATIO_TARGET:g}x the HTTP ceiling's"
        )
        bridge = self.row(BRIDGE, THROUGHPUT_CONNECTIONS)
        ceiling = self.row(HTTP_CEILING, THROUGHPUT_CONNECTIONS)
        bridge_us = bridge.cpu_us_per_request if bridge else None
        ceiling_us = ceiling.cpu_us_per_request if ceiling else None
        if not bridge_us or not ceiling_us:
            return Target(name, None, "needs bridge and HTTP ceiling at 64 connections")
        ratio = bridge_us / ceiling_us
        return Target(
            name,
            ratio <= CPU_PER_REQUEST_RATIO_TARGET,
            f"{bridge_us:,.0f} / {ceiling_us:,.0f} us/req = {ratio:.2f}x",
        )

    def _throughput_ratio(self, server: str, base: str) -> tuple[str, float] | None:
        """``server``'s req/s at 64 connections over ``base``'s, with the figures."""
        row = self.row(server, THROUGHPUT_CONNECTIONS)
        base_row = self.row(base, THROUGHPUT_CONNECTIONS)
        if row is None or base_row is None or not base_row.rps:
            return None
        ratio = row.rps / base_row.rps
        return f"{row.rps:,.0f} / {base_row.rps:,.0f} req/s = {ratio:.2f}x", ratio

    def _p99_target(self) -> Target:
        name = "p99 no worse than reference at every concurrency"
        pairs = [
            (bridge, self.row(REFERENCE, bridge.connections)) for bridge in self.server_rows(BRIDGE)
        ]
        compared = [(bridge, reference) for bridge, reference in pairs if reference is not None]
        if not compared:
            return Target(name, None, "needs bridge and reference rows")
        parts = [
            f"c={bridge.connections}: {bridge.p99_ms:.2f} vs {reference.p99_ms:.2f} ms"
            for bridge, reference in compared
        ]
        passed = all(bridge.p99_ms <= reference.p99_ms for bridge, reference in compared)
        return Target(name, passed, "; ".join(parts))

    def _redis_dedup_target(self) -> Target:
        name = (
            f"throughput at {THROUGHPUT_CONNECTIONS} connections with dedup in Redis >= "
            f"{REDIS_DEDUP_RATIO_TARGET:g}x the in-process store's"
        )
        compared = self._throughput_ratio(BRIDGE_REDIS, BRIDGE)
        if compared is None:
            return Target(name, None, "needs bridge and bridge-redis at 64 connections")
        detail, ratio = compared
        return Target(name, ratio >= REDIS_DEDUP_RATIO_TARGET, detail)

    def _floor_target(self) -> Target:
        name = (
            f"1-connection p50 within {LATENCY_OVER_FLOOR_TARGET_MS:g} ms of the bare "
            "single-in-flight confirm median"
        )
        bridge = self.row(BRIDGE, 1)
        floor = self.row(CONFIRM_LOOP, 1)
        if bridge is None or floor is None:
            return Target(name, None, "needs bridge at 1 connection and the confirm loop at 1")
        over = bridge.p50_ms - floor.p50_ms
        return Target(
            name,
            over <= LATENCY_OVER_FLOOR_TARGET_MS,
            f"{bridge.p50_ms:.3f} - {floor.p50_ms:.3f} = {over:.3f} ms",
        )

    def _rss_target(self) -> Target:
        name = f"peak RSS of {LABELS[BRIDGE]} < {PEAK_RSS_TARGET_MB:g} MB"
        peaks = [row.peak_rss_mb for row in self.server_rows(BRIDGE) if row.peak_rss_mb]
        if not peaks:
            return Target(name, None, "no bridge row")
        return Target(name, max(peaks) < PEAK_RSS_TARGET_MB, f"max {max(peaks):.1f} MB")

    def ratio_lines(self) -> list[str]:
        ceiling_64 = self.row(CONFIRM_LOOP, THROUGHPUT_CONNECTIONS)
        lines = [
            "| server | conns | rps / reference | p99 / reference | rps / HTTP ceiling "
            "| rps / confirm loop (64) | CPU us/req / HTTP ceiling |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for server in (BRIDGE, BRIDGE_WORKERS, BRIDGE_REDIS, BRIDGE_ARCHIVE, BRIDGE_FIXED_LIMIT):
            for bridge in self.server_rows(server):
                reference = self.row(REFERENCE, bridge.connections)
                http = self.row(HTTP_CEILING, bridge.connections)
                http_cpu = http.cpu_us_per_request if http else None
                lines.append(
                    f"| {LABELS[server]} | {bridge.connections} "
                    f"| {_ratio(bridge.rps, reference.rps if reference else None)} "
                    f"| {_ratio(bridge.p99_ms, reference.p99_ms if reference else None)} "
                    f"| {_ratio(bridge.rps, http.rps if http else None)} "
                    f"| {_ratio(bridge.rps, ceiling_64.rps if ceiling_64 else None)} "
                    f"| {_ratio(bridge.cpu_us_per_request, http_cpu)} |"
                )
        return lines

    def markdown(self) -> str:
        status = "valid" if self.valid else "FAILED (see the gate column and failures below)"
        lines = [
            "# openai-webhook-bridge benchmark",
            "",
            f"Run: {self.plan.get('started', '?')}, {status}.",
            "",
            "## Machine",
            "",
            *(f"- {key}: {value}" for key, value in self.machine.items()),
            "",
            "## Plan",
            "",
            *(f"- {key}: {value}" for key, value in self.plan.items()),
            "",
            "## Results",
            "",
            "| server | conns | req/s | p50 ms | p99 ms | peak RSS MB "
            "| server CPU | CPU us/req | broker CPU | machine CPU | requests | publish limit "
            "| gate |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| --- |",
        ]
        for row in self.rows:
            rss = f"{row.peak_rss_mb:.1f}" if row.peak_rss_mb is not None else "-"
            gate = "ok" if row.ok else "FAIL: " + "; ".join(row.problems)
            cpu_per_request = row.cpu_us_per_request
            per_request = f"{cpu_per_request:,.0f}" if cpu_per_request is not None else "-"
            broker = f"{row.broker_cores:.2f}" if row.broker_cores is not None else "-"
            lines.append(
                f"| {LABELS.get(row.server, row.server)} | {row.connections} | {row.rps:,.0f} "
                f"| {row.p50_ms:.2f} | {row.p99_ms:.2f} | {rss} | {row.server_cores:.2f} "
                f"| {per_request} | {broker} | {row.machine_cores:.2f} | {row.completed:,} "
                f"| {_limit_range(row.publish_limits)} | {gate} |"
            )
        lines += ["", "## Ratios", "", *self.ratio_lines(), "", "## Targets", ""]
        lines += [f"- **{t.verdict}** {t.name}: {t.detail}" for t in self.targets()]
        if self.failures:
            lines += ["", "## Failures", "", *(f"- {failure}" for failure in self.failures)]
        if self.background:
            busy = ", ".join(f"{when} {cores:.2f}" for when, cores in self.background.items())
            lines += ["", f"Cores busy elsewhere while this run idled: {busy}."]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in self.notes)]
        if self.profile is not None:
            lines += ["", "## Profile at 64 connections", "", self.profile.markdown()]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "plan": self.plan,
            "broker_latency_ms": self.broker_latency_ms,
            "broker_relay": asdict(self.broker_relay) if self.broker_relay is not None else None,
            "valid": self.valid,
            "rows": [asdict(row) for row in self.rows],
            "targets": [
                {"name": t.name, "verdict": t.verdict, "detail": t.detail} for t in self.targets()
            ],
            "failures": self.failures,
            "notes": self.notes,
            "background_cpu_busy": self.background,
            "profile": asdict(self.profile) if self.profile is not None else None,
        }


def median_row(rows: Sequence[Row]) -> Row:
    """One row for a point measured in several rounds: the median of each number, the
    highest peak RSS, and every round's problems."""
    first = rows[0]
    if len(rows) == 1:
        return first
    peaks = [row.peak_rss_mb for row in rows if row.peak_rss_mb is not None]
    brokers = [row.broker_cores for row in rows if row.broker_cores is not None]
    limits = [row.publish_limits for row in rows if row.publish_limits is not None]
    return Row(
        server=first.server,
        connections=first.connections,
        rps=statistics.median(row.rps for row in rows),
        p50_ms=statistics.median(row.p50_ms for row in rows),
        p99_ms=statistics.median(row.p99_ms for row in rows),
        peak_rss_mb=max(peaks) if peaks else None,
        completed=sum(row.completed for row in rows),
        server_cores=statistics.median(row.server_cores for row in rows),
        broker_cores=statistics.median(brokers) if brokers else None,
        machine_cores=statistics.median(row.machine_cores for row in rows),
        problems=[
            f"round {number}: {problem}"
            for number, row in enumerate(rows, start=1)
            for problem in row.problems
        ],
        publish_limits=(
            (min(low for low, _ in limits), max(high for _, high in limits)) if limits else None
        ),
        detail={"rounds": [asdict(row) for row in rows]},
    )


def _limit_range(limits: tuple[int, int] | None) -> str:
    if limits is None:
        return "-"
    low, high = limits
    return str(low) if low == high else f"{low}-{high}"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def machine_info(rabbitmq_version: str) -> dict[str, str]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "CPU": model,
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": _memory_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "RabbitMQ": rabbitmq_version,
        "wrk": _wrk_version(),
    }
    versions = []
    for package in _PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    info["packages"] = ", ".join(versions)
    return info


def _memory_total() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _wrk_version() -> str:
    executable = wrk_path()
    if executable is None:
        return "not installed"
    # wrk has no --version: it prints its version above the usage text and exits non-zero.
    result = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    first = (result.stdout or result.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"
