"""Servers under test as child processes, and their peak memory from ``/proc``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench.signed_requests import WEBHOOK_PATH

HOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
T = TypeVar("T")


class ServerFailed(RuntimeError):
    """A server did not start, or not as asked."""


def run_until_terminated(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, with SIGTERM ending ``main`` as Ctrl-C does: cancelled, so
    that its own clean-up stops the servers and tools it started instead of leaving them
    running. Then the process exits with 130 or 143, as one ended by the signal would."""
    terminated = False

    async def cancelled_on_sigterm() -> T:
        task = asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
        return await main

    try:
        return asyncio.run(cancelled_on_sigterm())
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(EXIT_TERMINATED) from None
        raise


async def communicate_or_kill(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """``process.communicate()``; a caller cancelled or timed out kills the process first,
    so that no wrk or profiler outlives the run that started it."""
    try:
        stdout, stderr = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return stdout or b"", stderr or b""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_environment(**extra: str) -> dict[str, str]:
    """The harness's environment without any ``BRIDGE_*`` or ``BENCH_*`` setting, plus ``extra``.

    A setting left over in the caller's shell would silently change what is measured.
    """
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("BRIDGE_", "BENCH_"))
    }
    environment.update(extra)
    return environment


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, found through each process's parent in ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields resume after the last ")".
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    ready_path: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{WEBHOOK_PATH}"

    @property
    def host_header(self) -> str:
        return f"{HOST}:{self.port}"

    def pids(self) -> list[int]:
        return [self.process.pid, *descendants(self.process.pid)]

    def reset_peak_rss(self) -> bool:
        """Restart the peak-RSS count of every process, so the next peak is one point's own.

        Writing 5 to ``clear_refs`` resets ``VmHWM`` (Linux 4.0+); where that is not
        allowed the peak stays the one since the process started, which is reported.
        """
        reset = True
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                reset = False
        return reset

    def rss_mb(self) -> float:
        """``VmRSS`` summed over the server's processes."""
        return sum(_status_kib(pid, "VmRSS") for pid in self.pids()) / 1024

    def open_descriptors(self) -> int:
        """File descriptors open in the server's processes (sockets, files, pipes)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def peak_rss_mb(self) -> float:
        """``VmHWM`` summed over the server's processes (an upper bound with workers)."""
        return sum(_status_kib(pid, "VmHWM") for pid in self.pids()) / 1024

    async def wait_ready(self, consecutive: int = 1) -> None:
        """Wait until ``ready_path`` answers 200 ``consecutive`` times on fresh connections.

        Several answers in a row on new connections reach every worker sharing the
        port, not only the first one up.
        """
        deadline = time.monotonic() + READY_TIMEOUT_S
        successes = 0
        url = f"http://{HOST}:{self.port}{self.ready_path}"
        timeout = aiohttp.ClientTimeout(total=2)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                )
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                try:
                    async with session.get(url) as response:
                        successes = successes + 1 if response.status == 200 else 0
                except (aiohttp.ClientError, TimeoutError):
                    successes = 0
            if successes >= consecutive:
                return
            await asyncio.sleep(0.05 if successes else 0.2)
        raise ServerFailed(f"{self.name} was not ready within {READY_TIMEOUT_S:g} s")

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return await asyncio.to_thread(self.process.wait)


def start_server(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    ready_path: str,
    environment: Mapping[str, str],
    log_dir: Path,
    cwd: Path,
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            env=dict(environment),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(name, process, port, ready_path, log_path)


def machine_cpu_seconds() -> float:
    """CPU seconds spent by everything on the machine since boot, all CPUs together."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


async def machine_busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy over ``seconds`` while this run idles: the load of others on the results."""
    before = machine_cpu_seconds()
    await asyncio.sleep(seconds)
    return (machine_cpu_seconds() - before) / seconds


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of live processes (threads included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def find_broker_pid() -> int | None:
    """The local RabbitMQ node's Erlang VM, so its CPU per request can be reported.

    ``rabbitmqctl`` runs short-lived Erlang VMs too; the node is the one booting ``rabbit``.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments and arguments[0].endswith(b"beam.smp") and b"rabbit" in arguments:
            boot = arguments.index(b"rabbit")
            if boot > 0 and arguments[boot - 1] == b"-s":
                return int(entry.name)
    return None
