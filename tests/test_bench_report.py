"""bench/report.py: the ratios and the targets, from rows made up for the purpose."""

from __future__ import annotations

import json

import pytest

from bench.relay import RelaySummary
from bench.report import BRIDGE, HTTP_CEILING, REFERENCE, Report, Row
from bench.run import build_parser, plan_from


def row(
    server: str,
    rps: float,
    *,
    cores: float = 1.0,
    connections: int = 64,
    p99_ms: float = 5.0,
    rss_mb: float | None = 80.0,
) -> Row:
    return Row(
        server=server, connections=connections, rps=rps, p50_ms=2.0, p99_ms=p99_ms,
        peak_rss_mb=rss_mb, completed=int(rps * 3), server_cores=cores, broker_cores=0.5,
        machine_cores=1.8,
    )  # fmt: skip


def report(*rows: Row) -> Report:
    return Report(machine={}, plan={}, rows=list(rows))


def verdicts(measured: Report) -> dict[str, bool | None]:
    return {target.name: target.passed for target in measured.targets()}


def test_the_ratio_table_divides_cpu_per_request_by_the_http_ceilings() -> None:
    # 0.5 cores at 5,000 req/s is 100 us/req; 1.0 core at 20,000 req/s is 50 us/req.
    measured = report(row(BRIDGE, 5_000, cores=0.5), row(HTTP_CEILING, 20_000, cores=1.0))
    header, _, bridge_line = measured.ratio_lines()

    assert header.endswith("| CPU us/req / HTTP ceiling |")
    assert bridge_line.endswith("| 2.00x |")


def test_the_cpu_ratio_is_a_dash_without_an_http_ceiling_at_that_concurrency() -> None:
    measured = report(row(BRIDGE, 5_000), row(HTTP_CEILING, 20_000, connections=16))
    assert measured.ratio_lines()[2].endswith("| - |")


def test_throughput_must_reach_twice_the_reference() -> None:
    name = "throughput at 64 connections >= 2x reference"
    assert verdicts(report(row(BRIDGE, 2_000), row(REFERENCE, 1_000)))[name] is True
    assert verdicts(report(row(BRIDGE, 1_900), row(REFERENCE, 1_000)))[name] is False
    assert verdicts(report(row(BRIDGE, 1_900)))[name] is None


def test_cpu_per_request_may_be_at_most_three_times_the_http_ceilings() -> None:
    name = "CPU per request at 64 connections <= 3x the HTTP ceiling's"
    ceiling = row(HTTP_CEILING, 10_000, cores=1.0)  # 100 us/req
    at_three = report(row(BRIDGE, 2_000, cores=0.6), ceiling)  # 300 us/req
    above = report(row(BRIDGE, 2_000, cores=0.62), ceiling)  # 310 us/req

    assert verdicts(at_three)[name] is True
    assert verdicts(above)[name] is False
    assert verdicts(report(row(BRIDGE, 2_000)))[name] is None
    assert verdicts(report(ceiling))[name] is None
    assert "300 / 100 us/req = 3.00x" in {t.detail for t in at_three.targets()}


def test_the_bridge_must_peak_under_100_mb() -> None:
    name = "peak RSS of bridge (defaults) < 100 MB"
    assert verdicts(report(row(BRIDGE, 1, rss_mb=99.0)))[name] is True
    assert verdicts(report(row(BRIDGE, 1, rss_mb=100.0)))[name] is False
    # Other rows' memory is not the bridge's.
    assert verdicts(report(row(BRIDGE, 1), row(REFERENCE, 1, rss_mb=300.0)))[name] is True


def test_the_report_lists_every_target_once() -> None:
    names = list(verdicts(report()))
    assert len(names) == len(set(names)) == 6
    assert not any("aim" in name for name in names)


def test_the_broker_latency_is_in_the_run_description_and_the_json() -> None:
    args = build_parser().parse_args(["--quick", "--broker-latency-ms", "2"])
    plan = plan_from(args)
    measured = Report(machine={}, plan=plan.describe(), broker_latency_ms=plan.broker_latency_ms)
    measured.broker_relay = RelaySummary(
        delay_ms=2.0, chunks=10, bytes=1000, mean_hold_ms=2.1, shortest_hold_ms=2.0,
        longest_hold_ms=3.0, cpu_s=0.5,
    )  # fmt: skip

    assert "- broker latency: +2 ms each way (bench/relay.py)" in measured.markdown()
    written = json.loads(json.dumps(measured.as_json()))
    assert written["broker_latency_ms"] == 2.0
    assert written["broker_relay"]["mean_hold_ms"] == 2.1
    direct = plan_from(build_parser().parse_args(["--quick"]))
    assert direct.describe()["broker latency"].startswith("none")


def test_extra_queue_arguments_are_parsed_and_described() -> None:
    args = build_parser().parse_args(
        ["--queue-type", "classic", "--queue-argument", "x-queue-mode=lazy",
         "--queue-argument", "x-max-length=1000000"]
    )  # fmt: skip
    plan = plan_from(args)

    assert plan.queue_arguments == (("x-queue-mode", "lazy"), ("x-max-length", 1_000_000))
    assert plan.describe()["bound queue"].endswith(
        "binding '#', x-queue-mode=lazy, x-max-length=1000000"
    )
    for refused in ("x-queue-type=quorum", "mode=lazy", "x-queue-mode", "x-queue-mode="):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--queue-argument", refused])
