"""The examples of the tutorials, the how-to guides and the README, run as a reader would.

Every ``sh`` or ``python`` block there is preceded by exactly one marker (see
docs/how-to/development.md): ``run`` (with ``exit=N`` and ``expect="TEXT"``),
``background`` (with ``ready="TEXT"``) or ``skip reason="WHY"``; the README's first
command is ``readme-quickstart``. A page's blocks run in order, in one throwaway
directory, in the install without extras, against the local broker, with an exchange of
the page's own; background blocks are stopped with SIGTERM when the page is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from yarl import URL

from bridge.settings import Settings
from tests.conftest import AMQP_URL
from tests.install_profiles import InstalledProfile, checkout_files
from tests.rabbitmq import needs_rabbitmqctl, rabbitmqctl

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted(
    [*(ROOT / "docs" / "tutorials").glob("*.md"), *(ROOT / "docs" / "how-to").glob("*.md")]
)
PAGES = [*GUIDES, ROOT / "README.md"]
RUN_LANGUAGES = ("sh", "python")
# The bridge's default ports, where the examples' bridge listens and `trigger` posts.
WEBHOOK_PORT = int(Settings.model_fields["port"].default)
OPERATIONS_PORT = int(Settings.model_fields["metrics_port"].default) or WEBHOOK_PORT
RUN_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
QUICKSTART_TIMEOUT = 600.0
# The install profile is built first (a few minutes the first time), then each block runs.
PAGE_TIMEOUT = 900.0
PORT_WAIT = 60.0
# What the bridge logs once it can publish; /readyz answers 200 from then on.
QUICKSTART_READY = "topology declared"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<language>[^\s`{]*)")
_MARKER = re.compile(r"^<!--\s*example:\s*(?P<kind>[a-z-]+)(?P<arguments>.*?)\s*-->$")
_ARGUMENT = re.compile(r'\s+(?P<name>[a-z]+)=(?:"(?P<quoted>[^"]*)"|(?P<bare>\S+))')
# The arguments each kind of marker takes, and those it must have.
_ARGUMENTS: dict[str, tuple[set[str], set[str]]] = {
    "run": ({"exit", "expect"}, set()),
    "background": ({"ready"}, set()),
    "skip": ({"reason"}, {"reason"}),
    "readme-quickstart": (set(), set()),
}


class MarkerError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    """1-based line of the opening fence."""

    language: str
    code: str
    kind: str
    arguments: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"


def _shown(page: Path) -> str:
    return str(page.relative_to(ROOT) if page.is_relative_to(ROOT) else page)


def parse_marker(text: str) -> tuple[str, dict[str, str]]:
    matched = _MARKER.match(text.strip())
    if matched is None:
        raise MarkerError("no <!-- example: ... --> marker on the line right before the block")
    kind = matched["kind"]
    if kind not in _ARGUMENTS:
        raise MarkerError(f"unknown marker kind {kind!r}; one of {sorted(_ARGUMENTS)}")
    rest = matched["arguments"]
    arguments = {
        found["name"]: found["quoted"] if found["quoted"] is not None else found["bare"]
        for found in _ARGUMENT.finditer(rest)
    }
    if _ARGUMENT.sub("", rest).strip():
        raise MarkerError(f"cannot read the marker's arguments {rest.strip()!r}")
    allowed, required = _ARGUMENTS[kind]
    if unknown := set(arguments) - allowed:
        raise MarkerError(
            f"{kind} takes {sorted(allowed) or 'no arguments'}, not {sorted(unknown)}"
        )
    if missing := required - set(arguments):
        raise MarkerError(f"{kind} needs {sorted(missing)}")
    if "exit" in arguments and not arguments["exit"].isdigit():
        raise MarkerError(f"exit={arguments['exit']} is not a status")
    return kind, arguments


def read_examples(page: Path) -> tuple[list[Example], list[str]]:
    """The page's runnable blocks with their markers, and every marker problem found."""
    lines = page.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    problems: list[str] = []
    marked_lines: set[int] = set()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = index + 1
        while end < len(lines) and not re.match(
            rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            end += 1
        language = opening["language"]
        if language in RUN_LANGUAGES:
            where = f"{_shown(page)}:{index + 1}"
            before = lines[index - 1] if index else ""
            code = "\n".join(line[indent:] for line in lines[index + 1 : end]) + "\n"
            marked_lines.add(index)
            try:
                kind, arguments = parse_marker(before)
                if index >= 2 and _MARKER.match(lines[index - 2].strip()):
                    raise MarkerError("two markers before one block")
                if kind == "readme-quickstart" and page.name != "README.md":
                    raise MarkerError("readme-quickstart marks the README's first command only")
                examples.append(Example(page, index + 1, language, code, kind, arguments))
            except MarkerError as error:
                problems.append(f"{where}: {error}")
        index = end + 1
    for number, line in enumerate(lines):
        if _MARKER.match(line.strip()) and number + 1 not in marked_lines:
            problems.append(
                f"{_shown(page)}:{number + 1}: a marker not right before an sh or python block"
            )
    return examples, problems


def test_every_example_has_one_valid_marker() -> None:
    problems = [problem for page in PAGES for problem in read_examples(page)[1]]
    assert not problems, "examples without a valid marker:\n" + "\n".join(problems)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Background:
    example: Example
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _failure(example: Example, problem: str, output: str) -> str:
    return (
        f"example at {example.where} ({example.kind} {example.arguments}): {problem}\n"
        f"--- the block ---\n{example.code}--- its output ---\n{output}"
    )


def _fail(example: Example, problem: str, output: str) -> NoReturn:
    pytest.fail(_failure(example, problem, output), pytrace=False)


def _command(example: Example, profile: InstalledProfile) -> list[str]:
    if example.language == "python":
        return [str(profile.python), "-c", example.code]
    return ["bash", "-euo", "pipefail", "-c", example.code]


def _run(example: Example, profile: InstalledProfile, cwd: Path, env: dict[str, str]) -> None:
    try:
        done = subprocess.run(
            _command(example, profile),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        output = (expired.output or b"").decode(errors="replace")
        _fail(example, f"still running after {RUN_TIMEOUT:g} s", output)
    output = done.stdout.decode(errors="replace")
    expected_status = int(example.arguments.get("exit", "0"))
    if done.returncode != expected_status:
        _fail(example, f"exit status {done.returncode}, expected {expected_status}", output)
    expected = example.arguments.get("expect")
    if expected is not None and expected not in output:
        _fail(example, f"{expected!r} not in its output", output)


def _start(example: Example, command: list[str], cwd: Path, env: dict[str, str]) -> Background:
    """Start ``command`` in a process group of its own, its output going to a file."""
    log = cwd.parent / f"background-{example.line}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Background(example, process, log)


def _wait_ready(background: Background) -> None:
    ready = background.example.arguments.get("ready")
    if ready is None:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while ready not in background.output():
        if background.process.poll() is not None:
            _fail(
                background.example,
                f"exited with status {background.process.returncode} before {ready!r}",
                background.output(),
            )
        if time.monotonic() > deadline:
            _fail(
                background.example,
                f"{ready!r} not in its output after {READY_TIMEOUT:g} s",
                background.output(),
            )
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> bool:
    """SIGTERM to its process group, then SIGKILL after the grace period; whether it
    stopped in time (or had already exited)."""
    if process.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


def _stop_all(started: list[Background]) -> list[str]:
    """Stop every background example, the last started first; what went wrong."""
    problems = []
    for background in reversed(started):
        ended_by_itself = background.process.poll() is not None
        if not _stop(background.process):
            problems.append(
                _failure(
                    background.example,
                    f"did not stop within {STOP_GRACE:g} s of SIGTERM",
                    background.output(),
                )
            )
        elif ended_by_itself and background.process.returncode != 0:
            problems.append(
                _failure(
                    background.example,
                    f"exited by itself with status {background.process.returncode}",
                    background.output(),
                )
            )
    return problems


@pytest.fixture(scope="module")
def examples_vhost() -> Iterator[str]:
    """A virtual host the examples declare into, deleted with everything in it afterwards:
    the pages name durable queues of their own (``billing``), as a reader's would."""
    vhost = f"docs-examples-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


@contextlib.contextmanager
def _ports_for_examples() -> Iterator[None]:
    """Run with the bridge's default ports free: the examples' bridge listens there and
    ``webhook-bridge trigger`` posts there. Another test's bridge may be finishing."""
    deadline = time.monotonic() + PORT_WAIT
    while busy := [port for port in {WEBHOOK_PORT, OPERATIONS_PORT} if _port_in_use(port)]:
        if time.monotonic() > deadline:
            pytest.skip(f"port {busy[0]} stayed in use for {PORT_WAIT:g} s")
        time.sleep(0.5)
    yield


def _pages_with_examples() -> list[Path]:
    return [
        page
        for page in PAGES
        if any(example.kind in ("run", "background") for example in read_examples(page)[0])
    ]


@pytest.mark.install
@pytest.mark.broker
@needs_rabbitmqctl
@pytest.mark.timeout(PAGE_TIMEOUT)
@pytest.mark.parametrize("page", _pages_with_examples(), ids=_shown)
def test_examples_of_page_run(
    page: Path, plain_install: InstalledProfile, examples_vhost: str, tmp_path: Path
) -> None:
    examples, problems = read_examples(page)
    assert not problems, problems
    exchange = f"docs-{page.stem}-{uuid.uuid4().hex[:8]}"
    broker = URL(AMQP_URL).with_path(f"/{examples_vhost}")
    env = plain_install.environ(BRIDGE_EXCHANGE=exchange, BRIDGE_AMQP_URL=str(broker))
    cwd = tmp_path / "work"
    cwd.mkdir()
    started: list[Background] = []
    with _ports_for_examples():
        try:
            for example in examples:
                if example.kind == "run":
                    _run(example, plain_install, cwd, env)
                elif example.kind == "background":
                    started.append(_start(example, _command(example, plain_install), cwd, env))
                    _wait_ready(started[-1])
        finally:
            stop_problems = _stop_all(started)
    assert not stop_problems, "\n\n".join(stop_problems)


def _readyz() -> int | None:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{OPERATIONS_PORT}/readyz", timeout=2
        ) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _fresh_copy(target: Path) -> None:
    """The repository's files as a clean checkout holds them (nothing git-ignored)."""
    for name in checkout_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


@pytest.mark.install
@pytest.mark.broker
@pytest.mark.timeout(QUICKSTART_TIMEOUT + READY_TIMEOUT + 2 * STOP_GRACE)
def test_readme_quickstart_installs_and_starts_the_bridge(tmp_path: Path) -> None:
    (quickstart,) = [
        example
        for example in read_examples(ROOT / "README.md")[0]
        if example.kind == "readme-quickstart"
    ]
    clone = tmp_path / "clone"
    _fresh_copy(clone)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BRIDGE_", "OTEL_", "VIRTUAL_ENV", "PYTHON"))
    }
    with _ports_for_examples():
        background = _start(
            quickstart, ["bash", "-euo", "pipefail", "-c", quickstart.code], clone, env
        )
        try:
            _wait_quickstart_ready(background)
        finally:
            # The bridge, not the bash running the block: the block's status is the bridge's.
            _signal_members(background.process.pid, signal.SIGTERM)
            stopped = _stop(background.process)
    assert stopped, _failure(quickstart, "did not stop on SIGTERM", background.output())
    assert background.process.returncode == 0, _failure(
        quickstart,
        f"exit status {background.process.returncode} after SIGTERM",
        background.output(),
    )


def _wait_quickstart_ready(background: Background) -> None:
    """Until the bridge logged that it can publish and answers /readyz 200: its own log
    line too, since /readyz alone could be another bridge's on this port."""
    deadline = time.monotonic() + QUICKSTART_TIMEOUT
    status = None
    while QUICKSTART_READY not in background.output() or (status := _readyz()) != 200:
        if background.process.poll() is not None:
            _fail(background.example, "exited before it was ready", background.output())
        if QUICKSTART_READY in background.output():
            deadline = min(deadline, time.monotonic() + READY_TIMEOUT)
        if time.monotonic() > deadline:
            _fail(
                background.example,
                f"not ready in time: {QUICKSTART_READY!r} logged, /readyz answered {status}",
                background.output(),
            )
        time.sleep(0.5)


def _signal_members(group: int, signal_number: int) -> None:
    """Signal every process of process group ``group`` but its leader."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and pid != group:
                os.kill(pid, signal_number)
