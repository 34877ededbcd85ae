"""Sampling a server under load with py-spy, and summarising where its time goes."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import communicate_or_kill

SAMPLE_RATE = 200
_LINE_NUMBER = re.compile(r":\d+\)$")


class ProfilerUnavailable(RuntimeError):
    pass


def py_spy_path() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


async def record(pid: int, duration_s: int, output: Path, output_format: str) -> None:
    """Sample ``pid`` for ``duration_s`` into ``output`` (``raw``, ``flamegraph`` or
    ``speedscope``).

    The target is paused for each sample (py-spy's default): reading it while it runs
    (``--nonblocking``) tore many stacks, attributing their time to the wrong frames.
    """
    executable = py_spy_path()
    if executable is None:
        raise ProfilerUnavailable("py-spy is not installed (pip install py-spy)")
    process = await asyncio.create_subprocess_exec(
        executable,
        "record",
        f"--pid={pid}",
        f"--duration={duration_s}",
        f"--rate={SAMPLE_RATE}",
        f"--format={output_format}",
        f"--output={output}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await communicate_or_kill(process)
    if process.returncode != 0:
        raise ProfilerUnavailable(
            f"py-spy exited with {process.returncode}: {stdout.decode(errors='replace')}"
        )


@dataclass(frozen=True)
class FrameCost:
    frame: str
    self_share: float
    total_share: float


@dataclass(frozen=True)
class ProfileSummary:
    server: str
    samples: int
    top_self: list[FrameCost]
    top_total: list[FrameCost]
    self_by_package: list[tuple[str, float]]
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            f"{self.server}: {self.samples} samples while running Python or native code "
            "(idle waits excluded); shares are of those samples. The event loop's own C code "
            "(uvloop: epoll, socket reads, callbacks) shows as self time of `Runner.run`; "
            "a socket send shows as self time of the Python frame that wrote.",
            "",
            "| # | frame (by self time) | self % | total % |",
            "| ---: | --- | ---: | ---: |",
        ]
        for rank, cost in enumerate(self.top_self, start=1):
            lines.append(
                f"| {rank} | `{cost.frame}` | {cost.self_share:.1%} | {cost.total_share:.1%} |"
            )
        lines += [
            "",
            "| # | frame (by total time) | total % | self % |",
            "| ---: | --- | ---: | ---: |",
        ]
        for rank, cost in enumerate(self.top_total, start=1):
            lines.append(
                f"| {rank} | `{cost.frame}` | {cost.total_share:.1%} | {cost.self_share:.1%} |"
            )
        lines += ["", "| package or module | self % |", "| --- | ---: |"]
        lines += [f"| {name} | {share:.1%} |" for name, share in self.self_by_package]
        if self.files:
            lines += ["", *(f"- {label}: `{path}`" for label, path in self.files.items())]
        return "\n".join(lines)


def _frame_name(frame: str) -> str:
    # Lines of one function are merged: the question is which function costs, not which line.
    return _LINE_NUMBER.sub(")", frame.strip())


def _package(frame: str) -> str:
    location = frame.rpartition("(")[2].rstrip(")")
    path = location.split(":")[0]
    parts = Path(path).parts
    for marker in ("site-packages", "lib-dynload"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1 :]
            return rest[0].removesuffix(".py") if rest else marker
    if len(parts) > 1 and parts[-2].startswith("python3"):
        return parts[-1].removesuffix(".py")
    if len(parts) > 1:
        return parts[-2] if parts[-2] not in ("", "/") else parts[-1]
    return path.removesuffix(".py") or "?"


def summarise_collapsed(text: str, *, server: str, top: int = 15) -> ProfileSummary:
    """Aggregate py-spy's ``raw`` (collapsed stacks) output into self and total time."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";") if frame.strip()]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        package_counts[_package(frames[-1])] += count
        for frame in set(frames):
            total_counts[frame] += count
    if samples == 0:
        return ProfileSummary(server, 0, [], [], [])

    def cost(frame: str) -> FrameCost:
        return FrameCost(frame, self_counts[frame] / samples, total_counts[frame] / samples)

    # Frames nearly every sample passes through (the event loop, the thread) say nothing.
    informative = [frame for frame, count in total_counts.items() if count < 0.95 * samples]
    return ProfileSummary(
        server=server,
        samples=samples,
        top_self=[cost(frame) for frame, _ in self_counts.most_common(top)],
        top_total=[
            cost(frame) for frame in sorted(informative, key=lambda name: -total_counts[name])[:top]
        ],
        self_by_package=[
            (name, count / samples) for name, count in package_counts.most_common(top)
        ],
    )
