"""Changing the state of the broker under test with ``rabbitmqctl``, always restoring it
afterwards: the machine's RabbitMQ, or the node of the release a test runs against."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from yarl import URL

from tests.brokers import under_test

needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not on PATH"
)


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """``rabbitmqctl`` against the broker under test."""
    return under_test().ctl(*args, timeout=timeout)


def broker_port_answers() -> bool:
    url = URL(under_test().amqp_url)
    try:
        socket.create_connection((url.host, url.port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_for_broker(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not broker_port_answers():
        if time.monotonic() > deadline:
            raise AssertionError("RabbitMQ did not come back")
        time.sleep(0.2)


@contextlib.contextmanager
def app_stopped() -> Iterator[None]:
    """RabbitMQ's app stopped (the node keeps running), started again on exit."""
    rabbitmqctl("stop_app")
    try:
        yield
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
        wait_for_broker()


@contextlib.contextmanager
def memory_alarm() -> Iterator[None]:
    """A memory alarm: the broker blocks every publishing connection until it clears."""
    original = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", _watermark_argument(original))


@contextlib.contextmanager
def disk_alarm() -> Iterator[None]:
    """A disk alarm (free space below a limit set far above it): the same blocking."""
    original = rabbitmqctl("eval", "rabbit_disk_monitor:get_disk_free_limit().").strip()
    rabbitmqctl("set_disk_free_limit", str(10**18))
    try:
        yield
    finally:
        rabbitmqctl("set_disk_free_limit", original)


def _watermark_argument(erlang_value: str) -> str:
    # Relative watermarks print as a float; absolute ones as {absolute, Bytes}.
    if erlang_value.startswith("{absolute,"):
        return f"absolute {erlang_value.removeprefix('{absolute,').rstrip('}').strip()}"
    return erlang_value


@dataclass(frozen=True)
class BrokerUser:
    name: str
    password: str

    @property
    def amqp_url(self) -> str:
        return under_test().amqp_url.replace("guest:guest@", f"{self.name}:{self.password}@")


@contextlib.contextmanager
def temporary_user() -> Iterator[BrokerUser]:
    """A broker user with a random password and full rights on ``/``, deleted on exit.

    The password is hex: rabbitmqctl takes an argument that starts with ``-`` (as one
    in 64 URL-safe tokens does) for an option."""
    user = BrokerUser(f"test-{uuid.uuid4().hex[:10]}", secrets.token_hex(18))
    rabbitmqctl("add_user", user.name, user.password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user.name, ".*", ".*", ".*")
        yield user
    finally:
        rabbitmqctl("delete_user", user.name)


def close_connections_of(user: str) -> int:
    """Close every connection ``user`` has open (as a broker-side failure would)."""
    closed = 0
    for line in rabbitmqctl(
        "list_connections", "pid", "user", "--no-table-headers", "-q"
    ).splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == user:
            rabbitmqctl("close_connection", fields[0], "closed by test")
            closed += 1
    return closed
