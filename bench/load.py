"""Driving load with wrk, from its own process, and reading back what it measured."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import communicate_or_kill

LUA_SCRIPT = Path(__file__).with_name("wrk.lua")
PACED_LUA_SCRIPT = Path(__file__).with_name("wrk_paced.lua")
RESULT_MARKER = "BENCH_RESULT "
WRK_TIMEOUT_S = 10
"""Above the bridge's 5 s publish timeout, so a slow answer is recorded as what it was."""


class LoadError(RuntimeError):
    """wrk could not be run or printed no result."""


def wrk_path() -> str | None:
    return shutil.which("wrk")


@dataclass(frozen=True)
class WrkErrors:
    connect: int
    read: int
    write: int
    status: int
    timeout: int

    @property
    def total(self) -> int:
        return self.connect + self.read + self.write + self.status + self.timeout


@dataclass(frozen=True)
class LoadResult:
    connections: int
    threads: int
    duration_s: float
    completed: int
    """Responses wrk received within the duration."""
    issued: int
    """Requests wrk sent; up to one per connection is still unanswered when wrk stops."""
    non2xx: int
    errors: WrkErrors
    exhausted_threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.completed / self.duration_s if self.duration_s else 0.0

    def problems(self) -> list[str]:
        """Why this run must not count as a measurement (empty when it is sound)."""
        found = []
        if self.completed == 0:
            found.append("no request completed")
        if self.non2xx:
            found.append(f"{self.non2xx} non-2xx answers")
        if self.errors.total:
            found.append(
                "wrk errors: "
                + ", ".join(f"{name} {count}" for name, count in vars(self.errors).items() if count)
            )
        if self.issued - self.completed > self.connections:
            found.append(
                f"{self.issued - self.completed} requests unanswered "
                f"(more than the {self.connections} that can be in flight)"
            )
        return found


def parse_output(stdout: str, connections: int, threads: int) -> LoadResult:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            raw: dict[str, Any] = json.loads(line.removeprefix(RESULT_MARKER))
            break
    else:
        raise LoadError(f"wrk printed no {RESULT_MARKER.strip()} line:\n{stdout}")
    latency = raw["latency_us"]
    return LoadResult(
        connections=connections,
        threads=threads,
        duration_s=raw["duration_us"] / 1e6,
        completed=int(raw["requests"]),
        issued=int(raw["issued"]),
        non2xx=int(raw["non2xx"]),
        errors=WrkErrors(**{name: int(count) for name, count in raw["errors"].items()}),
        exhausted_threads=int(raw["exhausted_threads"]),
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
    )


async def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    request_prefix: Path,
    paced_rate: float | None = None,
) -> LoadResult:
    """Run wrk over the request files ``<request_prefix>.1 .. .<threads>``.

    With ``paced_rate``, wrk sends that many requests per second in all, each thread
    on a schedule that catches up after slow answers (``bench/wrk_paced.lua``);
    otherwise each connection sends as fast as answers come.
    """
    script, script_arguments = LUA_SCRIPT, [str(request_prefix)]
    if paced_rate is not None:
        thread_interval_ms = threads * 1000 / paced_rate
        script = PACED_LUA_SCRIPT
        script_arguments = [*script_arguments, f"{thread_interval_ms:.4f}"]
    executable = wrk_path()
    if executable is None:
        raise LoadError("wrk is not installed (Debian: apt-get install -y wrk)")
    process = await asyncio.create_subprocess_exec(
        executable,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={duration_s}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        f"--script={script}",
        url,
        "--",
        *script_arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await communicate_or_kill(process)
    if process.returncode != 0:
        raise LoadError(f"wrk exited with {process.returncode}: {stderr.decode(errors='replace')}")
    return parse_output(stdout.decode(errors="replace"), connections, threads)
