"""The benchmark's other modes: ``--soak`` and ``--instructions``, run tiny.

Nothing here judges speed; it checks that each mode measures what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import wrk_path
from bench.processes import EXIT_INTERRUPTED, EXIT_TERMINATED, descendants
from bench.soak import (
    DeduplicationBound,
    Interval,
    SoakReport,
    parse_duration,
    warmup_until_deduplication_full,
)

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def run_bench(*arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600)]
)
def test_durations_are_read_in_seconds_minutes_or_hours(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "5d", "1.5m", "-3s"])
def test_other_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_the_warm_up_lasts_until_the_deduplication_store_is_full() -> None:
    bound = DeduplicationBound(window_s=600, max_ids=100_000)
    assert warmup_until_deduplication_full(bound, rate=1000) == 100 + 60
    assert warmup_until_deduplication_full(bound, rate=10) == 600 + 60


def interval(at: float, *, rss: float = 60.0, fds: int = 16, tasks: int = 10) -> Interval:
    return Interval(
        ended_s=at, target_rate=100, rps=100, p50_ms=2, p99_ms=5, max_ms=9,
        rss_mb=rss, peak_rss_mb=rss + 1, open_descriptors=fds, tasks=tasks,
        descriptors_max=fds + 32, tasks_max=tasks + 32, server_cores=0.1, problems=[],
    )  # fmt: skip


def verdicts(intervals: list[Interval]) -> dict[str, bool | None]:
    report = SoakReport("run", "now", {}, {}, target_rate=100, warmup_s=10, intervals=intervals)
    return {verdict.name.split(" (")[0]: verdict.passed for verdict in report.verdicts()}


def test_a_steady_bridge_passes_every_verdict() -> None:
    steady = [interval(at) for at in range(0, 200, 20)]
    assert set(verdicts(steady).values()) == {True}


def test_growth_after_the_warm_up_fails_its_verdict() -> None:
    growing_rss = [interval(at, rss=60 + at / 20) for at in range(20, 220, 20)]
    leaking_sockets = [interval(at, fds=16 + at // 20) for at in range(20, 220, 20)]
    leaking_tasks = [interval(at, tasks=10 + at // 20) for at in range(20, 220, 20)]
    assert verdicts(growing_rss)["RSS drift after warm-up < 5%"] is False
    assert verdicts(leaking_sockets)["no growth in open descriptors"] is False
    assert verdicts(leaking_tasks)["no growth in asyncio tasks"] is False


def test_growth_during_the_warm_up_is_left_out() -> None:
    filling = [interval(at, rss=40 + at) for at in range(0, 11, 5)]
    steady = [interval(at, rss=51) for at in range(20, 200, 20)]
    assert verdicts(filling + steady)["RSS drift after warm-up < 5%"] is True


@pytest.mark.broker
@pytest.mark.timeout(120)
@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")
def test_a_short_soak_checks_every_interval_and_writes_its_results(tmp_path: Path) -> None:
    rate = 200
    run = run_bench(
        *("--soak", "16s", "--soak-interval", "4", "--soak-warmup", "4s"),
        *("--rate", str(rate), "--soak-connections", "8", "--amqp-url", AMQP_URL),
        *("--results", str(tmp_path)),
        timeout=100,
    )
    # Exit 1 is a verdict failed on a busy machine; the run itself must be sound.
    assert run.returncode in (0, 1), run.stderr
    assert "steady" in run.stdout
    result = json.loads((tmp_path / "soak-latest.json").read_text())
    assert (tmp_path / "soak-latest.md").read_text().startswith("# openai-webhook-bridge soak")
    assert result["failures"] == []
    intervals = result["intervals"]
    assert len(intervals) >= 3
    assert all(entry["problems"] == [] for entry in intervals), intervals
    assert result["scrapes"] >= 2
    assert all(entry["tasks"] is not None and entry["open_descriptors"] > 0 for entry in intervals)
    assert all(entry["descriptors_max"] > entry["open_descriptors"] for entry in intervals)
    assert 0.7 * rate < statistics.median(entry["rps"] for entry in intervals) < 1.3 * rate
    passed = {verdict["name"].split(" (")[0]: verdict["passed"] for verdict in result["verdicts"]}
    assert passed["no growth in open descriptors"] is True
    assert passed["no growth in asyncio tasks"] is True


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_are_counted_per_request_for_the_bridge_and_the_ceiling(
    tmp_path: Path,
) -> None:
    run = run_bench(
        "--instructions", "20", "--instructions-warmup", "10", "--results", str(tmp_path),
        timeout=170,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout
    result = json.loads((tmp_path / "instructions-latest.json").read_text())
    per_request = {count["server"]: count["per_request"] for count in result["counts"]}
    assert set(per_request) == {"bridge-immediate-confirm", "http-ceiling"}
    assert all(count["requests"] == 20 for count in result["counts"])
    # Far above zero (the dump was of the counted requests) and the bridge above HTTP alone.
    assert per_request["http-ceiling"] > 50_000
    assert result["ratio_to_http_ceiling"] > 1


@pytest.mark.timeout(90)
@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)],
)
def test_a_run_ended_by_a_signal_stops_the_servers_and_tools_it_started(
    tmp_path: Path, signum: signal.Signals, exit_code: int
) -> None:
    bench = subprocess.Popen(
        [
            sys.executable, "-m", "bench", "--servers", "reference", "--connections", "1",
            "--duration", "60", "--warmup", "1", "--amqp-url", AMQP_URL,
            "--results", str(tmp_path),
        ],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        started = _wait_for_descendants(bench.pid, {"wrk", "python"}, timeout=40)
        bench.send_signal(signum)
        _, stderr = bench.communicate(timeout=40)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == exit_code, stderr
    assert [pid for pid in started if Path(f"/proc/{pid}").exists()] == []


def _wait_for_descendants(pid: int, names: set[str], *, timeout: float) -> list[int]:
    """The processes under ``pid`` once one of each name runs there (wrk measuring a server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {child: _command_name(child) for child in descendants(pid)}
        if names <= {name for name in found.values() if name is not None}:
            return list(found)
        time.sleep(0.1)
    raise AssertionError(f"no {sorted(names)} under {pid} within {timeout} s")


def _command_name(pid: int) -> str | None:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return "python" if name.startswith("python") else name


def test_the_hydration_mode_measures_a_worker_beside_a_plain_consumer(tmp_path: Path) -> None:
    run = run_bench(
        *("--hydrate", "60", "--amqp-url", AMQP_URL, "--results", str(tmp_path)), timeout=170
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "hydrate-latest.json").read_text())
    assert result["events"] == 60
    for figure in (
        "objects_per_second",
        "hydrate_cpu_ms_per_event",
        "consume_cpu_ms_per_event",
        "consume_events_per_second",
    ):
        assert result[figure] > 0, figure
    assert "Hydration adds" in (tmp_path / "hydrate-latest.md").read_text()
