"""``python -m bench --instructions N``: instructions per request, counted by callgrind.

Timing on a shared machine is noisy; the number of instructions a request costs is
not. Each server runs under ``valgrind --tool=callgrind`` with instrumentation off
(so start-up runs at valgrind's uninstrumented speed); the harness, outside
valgrind, sends a warm-up of pre-signed webhooks on one keep-alive connection, then
turns instrumentation on (``callgrind_control -i on``), zeroes the counters, sends N
more one at a time, and dumps the count. Only the server process is counted.

Two servers are counted, so that the bridge's figure has a floor beside it:

- ``bench.immediate_confirm``: the bridge's app (verification, deduplication,
  classification, routing, metrics, the AMQP frames encoded) with a broker that
  confirms at once;
- ``bench.http_ceiling``: an aiohttp handler that reads the body and answers 200.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.processes import (
    Server,
    ServerFailed,
    clean_environment,
    communicate_or_kill,
    free_port,
    run_until_terminated,
    start_server,
)
from bench.report import HTTP_CEILING, machine_info
from bench.results import write_results
from bench.servers import ROOT
from bench.signed_requests import RequestFactory, SignedRequest, new_secret

BRIDGE_IMMEDIATE_CONFIRM = "bridge-immediate-confirm"
MODULES = {BRIDGE_IMMEDIATE_CONFIRM: "bench.immediate_confirm", HTTP_CEILING: "bench.http_ceiling"}
READY_PATHS = {BRIDGE_IMMEDIATE_CONFIRM: "/readyz", HTTP_CEILING: "/healthz"}
LABELS = {
    BRIDGE_IMMEDIATE_CONFIRM: "bridge, broker confirming at once (bench/immediate_confirm.py)",
    HTTP_CEILING: "HTTP ceiling (read body, 200)",
}
STARTUP_TIMEOUT_S = 180.0
"""Start-up under valgrind, even uninstrumented, takes several times longer than natively."""
REQUEST_TIMEOUT_S = 60.0
_SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.MULTILINE)


class CallgrindUnavailable(RuntimeError):
    """valgrind or callgrind_control is not installed."""


@dataclass(frozen=True)
class InstructionCount:
    server: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


@dataclass(frozen=True)
class InstructionReport:
    run_id: str
    started: str
    machine: dict[str, str]
    warmup_requests: int
    counts: list[InstructionCount]

    def ratio(self) -> float | None:
        by_server = {count.server: count.per_request for count in self.counts}
        if {BRIDGE_IMMEDIATE_CONFIRM, HTTP_CEILING} <= by_server.keys():
            return by_server[BRIDGE_IMMEDIATE_CONFIRM] / by_server[HTTP_CEILING]
        return None

    def markdown(self) -> str:
        lines = [
            f"# Instructions per request ({self.started})",
            "",
            f"Counted by callgrind over one keep-alive connection, one request at a time, after "
            f"{self.warmup_requests} uncounted warm-up requests.",
            "",
            "| server | requests counted | instructions | per request |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {LABELS[count.server]} | {count.requests:,} | {count.instructions:,} "
            f"| {count.per_request:,.0f} |"
            for count in self.counts
        ]
        ratio = self.ratio()
        if ratio is not None:
            lines += ["", f"The bridge costs {ratio:.2f}x the HTTP ceiling's instructions."]
        lines += ["", "## Machine", ""]
        lines += [f"- {name}: {value}" for name, value in self.machine.items()]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "started": self.started,
            "machine": self.machine,
            "warmup_requests": self.warmup_requests,
            "counts": [asdict(count) | {"per_request": count.per_request} for count in self.counts],
            "ratio_to_http_ceiling": self.ratio(),
        }


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CallgrindUnavailable(f"{name} is not installed (Debian: apt-get install -y valgrind)")
    return path


async def _callgrind_control(pid: int, *arguments: str) -> None:
    process = await asyncio.create_subprocess_exec(
        _tool("callgrind_control"),
        *arguments,
        str(pid),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        output, _ = await communicate_or_kill(process)
    if process.returncode != 0 or b"OK" not in output:
        raise ServerFailed(f"callgrind_control {' '.join(arguments)} failed: {output.decode()}")


async def _start_under_callgrind(server: str, secret: str, output_dir: Path) -> Server:
    port = free_port()
    command = [
        _tool("valgrind"),
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={output_dir}/callgrind.{server}.%p",
        sys.executable,
        "-m",
        MODULES[server],
        "--port",
        str(port),
    ]
    _tool("callgrind_control")
    started = start_server(
        server,
        command,
        port=port,
        ready_path=READY_PATHS[server],
        environment=clean_environment(BENCH_WEBHOOK_SECRET=secret),
        log_dir=output_dir,
        cwd=ROOT,
    )
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
    while True:
        try:
            await started.wait_ready()
            return started
        except ServerFailed:
            if started.process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                await started.stop()
                raise


async def _send_in_turn(server: Server, requests: list[SignedRequest]) -> None:
    """POST each request on one keep-alive connection, waiting for each answer."""
    reader, writer = await asyncio.open_connection(*server.host_header.split(":"))
    try:
        for request in requests:
            writer.write(request.raw(server.host_header))
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
            if status != 200:
                raise ServerFailed(f"{server.name} answered {status}; see {server.log_path}")
    finally:
        writer.close()


async def count_one(server: str, requests: int, warmup: int, output_dir: Path) -> InstructionCount:
    secret = new_secret()
    factory = RequestFactory(secret)
    # Signed now, sent within the bridge's five-minute tolerance.
    warmup_requests = [factory.new() for _ in range(warmup)]
    counted_requests = [factory.new() for _ in range(requests)]
    process = await _start_under_callgrind(server, secret, output_dir)
    pid = process.process.pid
    try:
        await _send_in_turn(process, warmup_requests)
        await _callgrind_control(pid, "--instr=on")
        await _callgrind_control(pid, "--zero")
        await _send_in_turn(process, counted_requests)
        await _callgrind_control(pid, "--dump")
    finally:
        await process.stop()
    return InstructionCount(server, requests, _dumped_instructions(output_dir, server, pid))


def _dumped_instructions(output_dir: Path, server: str, pid: int) -> int:
    """The count in the dump ``--dump`` wrote (``<file>.1``; the exit's own has no suffix)."""
    dump = output_dir / f"callgrind.{server}.{pid}.1"
    try:
        found = _SUMMARY.search(dump.read_bytes())
    except OSError:
        raise ServerFailed(f"callgrind wrote no dump for {server} ({dump})") from None
    if found is None:
        raise ServerFailed(f"no instruction summary in {dump}")
    return int(found.group(1))


async def count_instructions(requests: int, warmup: int, results_dir: Path) -> InstructionReport:
    started = datetime.now(tz=UTC)
    output_dir = results_dir / f"callgrind-{started:%Y%m%dT%H%M%SZ}"
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = []
    for server in MODULES:
        print(f"== {LABELS[server]}: {warmup} warm-up, {requests} counted", flush=True)
        count = await count_one(server, requests, warmup, output_dir)
        print(f"   {count.per_request:,.0f} instructions per request", flush=True)
        counts.append(count)
    return InstructionReport(
        run_id=f"{started:%Y%m%dT%H%M%SZ}",
        started=f"{started:%Y-%m-%d %H:%M:%S UTC}",
        machine=machine_info("not used"),
        warmup_requests=warmup,
        counts=counts,
    )


def run_instructions(requests: int, warmup: int, results_dir: Path) -> int:
    """The ``--instructions`` mode: 0 when counted, 2 when callgrind or a server failed."""
    try:
        report = run_until_terminated(count_instructions(requests, warmup, results_dir))
    except (CallgrindUnavailable, ServerFailed, OSError) as error:
        print(f"instructions could not be counted: {error}", file=sys.stderr)
        return 2
    path = write_results(
        results_dir, "instructions", report.run_id, report.markdown(), report.as_json()
    )
    print("\n" + report.markdown())
    print(f"written to {path} and .json", flush=True)
    return 0
