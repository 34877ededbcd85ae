"""Running the ingress: one process, or several workers sharing the port.

Workers each have their own event loop and AMQP connection and bind the same ports with
``SO_REUSEPORT``, so the kernel spreads connections across them: webhooks, and on the
operations port (``BRIDGE_METRICS_PORT``) probes and scrapes, which any worker answers
(``/metrics`` with every worker's counts, see bridge.metrics). The parent only
supervises: it forwards SIGTERM/SIGINT, and if a worker dies on its own it stops the
others and exits non-zero so that the orchestrator restarts the whole pod. If the parent
itself dies (SIGKILL, the OOM killer), the kernel sends each worker SIGTERM, so workers
drain and exit instead of holding the port as orphans.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from functools import partial
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web

from bridge.app import (
    INGRESS,
    OWNED_PUBLISHER,
    SERVER_OPTIONS,
    WEBHOOK_PATH,
    create_app,
    create_operations_app,
    dispatch_webhooks_directly,
)
from bridge.logs import configure_logging
from bridge.metrics import MULTIPROCESS_DIR_VARIABLE, SourceMetrics
from bridge.secrets import SECRET_FILE_NAME, SecretReloader, SecretSource
from bridge.settings import Settings
from bridge.signature import SignatureVerifier
from bridge.sources import shared_secret
from bridge.tracing import from_environment as tracing_from_environment

logger = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 10.0
EXIT_BROKER_NEEDS_OPERATOR = 2
FIXED_SECRETS = SecretSource("the settings")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
BACKLOG = 1024
WEBHOOK_RECEIVE_BUFFER_BYTES = 16 * 1024
"""SO_RCVBUF of each webhook connection (Linux doubles it), instead of autotuning's up to
``net.ipv4.tcp_rmem`` (MiBs).

Each read from a socket is handed to the HTTP parser whole, and a connection's first reads
are taken before its handler can look at the headers: with autotuning each of 500
connections sending a 256 KiB body at once had its whole body in memory (150 MiB) before
BRIDGE_MAX_BUFFERED_BYTES could refuse it. With this buffer a connection holds about
50 KiB before its handler decides, and a webhook of a few KiB still arrives in one read.
"""
YOUNG_COLLECTION_THRESHOLD = 20_000
"""Net new container objects before the cycle collector runs (CPython's default: 700).

Requests in flight hold a few hundred objects each, so at the default every few requests
set off a collection that walks all of them again, and promoted them to the older
generations to be walked again there: 2,300 collections, 5 % of the process's CPU, in
an 11 s run at 64 connections. Objects a request frees do not count, so at this threshold
the collector runs only when cycles (an exception's traceback) really accumulate.
"""


def run(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed: its faster sockets matter for throughput."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def serve(settings: Settings, secret_source: SecretSource = FIXED_SECRETS) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and exit 0.

    SIGHUP re-reads the secrets file, which is also polled, when ``secret_source`` has one.
    """
    app = create_app(settings, tracing=tracing_from_environment())
    reload_secrets_on_change(app, settings, secret_source)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.drain_timeout,
        **SERVER_OPTIONS,
    )
    ports = {runner: settings.port}
    if settings.metrics_port:
        operations = web.AppRunner(
            create_operations_app(app),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=settings.drain_timeout,
        )
        ports[operations] = settings.metrics_port
    # In this order they are cleaned up too: /readyz answers 503 while the webhooks drain.
    runners = list(ports)
    for each in runners:
        await each.setup()
    assert runner.server is not None
    dispatch_webhooks_directly(runner.server, app)
    tune_garbage_collection()
    for each, port in ports.items():
        try:
            sock = listen(
                settings.host,
                port,
                reuse_port=settings.workers > 1,
                receive_buffer=WEBHOOK_RECEIVE_BUFFER_BYTES if each is runner else None,
            )
        except OSError as error:
            await _clean_up(runners)
            logger.error("cannot listen on %s:%s: %s", settings.host, port, error.strerror)
            return 1
        await web.SockSite(each, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info(
        "listening on http://%s:%s%s (/healthz, /readyz and /metrics on port %s), publishing "
        "to exchange %s at %s (%s)",
        settings.host,
        settings.port,
        f"{WEBHOOK_PATH}/<source>" if settings.sources else WEBHOOK_PATH,
        settings.metrics_port or settings.port,
        settings.exchange,
        settings.amqp_url_redacted,
        _secrets_in_force(settings, secret_source),
    )
    broker_failed = app[OWNED_PUBLISHER].failed
    await _first_of(stop, broker_failed)
    app[INGRESS].shutting_down = True
    logger.info("shutting down: draining in-flight requests for up to %gs", settings.drain_timeout)
    await _clean_up(runners)
    logger.info("stopped")
    return EXIT_BROKER_NEEDS_OPERATOR if broker_failed.is_set() else 0


def _secrets_in_force(settings: Settings, source: SecretSource) -> str:
    def counted(keys: tuple[bytes, ...], where: SecretSource) -> str:
        plural = "" if len(keys) == 1 else "s"
        return f"{len(keys)} webhook secret{plural} from {where.description}"

    if not settings.sources:
        return counted(settings.signing_keys, source)
    return "; ".join(
        f"source {each.name}: {counted(each.keys, each.origin)}" for each in settings.source_secrets
    )


async def _clean_up(runners: list[web.AppRunner]) -> None:
    for runner in runners:
        await runner.cleanup()


def listen(host: str, port: int, *, reuse_port: bool, receive_buffer: int | None) -> socket.socket:
    """A listening TCP socket; ``receive_buffer`` fixes each connection's SO_RCVBUF."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if receive_buffer is not None:
            # Set before listen(): connections inherit it, and it sets the window offered.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def tune_garbage_collection() -> None:
    """Once started: never scan the start-up objects, and collect only for real cycles."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def reload_secrets_on_change(
    app: web.Application, settings: Settings, source: SecretSource
) -> None:
    """Swap the ingress's verifier when the secrets file changes; SIGHUP checks at once.

    With sources, each source's file is watched on its own: a list refused for one source
    leaves that source's last good list, and every other source, as they were.
    """
    if settings.sources:
        _reload_source_secrets(app, settings)
        return
    loop = asyncio.get_running_loop()
    if source.path is None:
        loop.add_signal_handler(signal.SIGHUP, _secrets_cannot_change, source)
        return
    ingress = app[INGRESS]
    counts = ingress.metrics.source(None)

    def apply(verifier: SignatureVerifier) -> None:
        counts.secret_count_changed(verifier.secret_count)
        ingress.verifiers[None] = verifier

    reloader = SecretReloader(
        source.path,
        current=lambda: ingress.verifiers[None],
        apply=apply,
        counted=counts.secrets_reloaded,
        initial_keys=settings.signing_keys,
    )
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    app.cleanup_ctx.append(lambda _app: reloader.watch(settings.secrets_poll_interval))


def _reload_source_secrets(app: web.Application, settings: Settings) -> None:
    ingress = app[INGRESS]
    in_force = {source.name: source.keys for source in settings.source_secrets}
    reloaders = []
    fixed = [source for source in settings.source_secrets if source.origin.path is None]
    for source in settings.source_secrets:
        if source.origin.path is None:
            continue
        name, counts = source.name, ingress.metrics.source(source.name)

        def apply(
            verifier: SignatureVerifier, name: str = name, counts: SourceMetrics = counts
        ) -> None:
            counts.secret_count_changed(verifier.secret_count)
            ingress.verifiers[name] = verifier

        def conflict(keys: tuple[bytes, ...], name: str = name) -> str | None:
            """A list sharing a secret with another source is refused; one that passes is
            the one in force from here on (applied, or unchanged)."""
            others = [(other, held) for other, held in in_force.items() if other != name]
            shared = shared_secret([*others, (name, keys)])
            if shared is not None:
                return f"source {shared[0]!r} holds one of its secrets"
            in_force[name] = keys
            return None

        reloaders.append(
            SecretReloader(
                source.origin.path,
                current=partial(ingress.verifiers.__getitem__, name),
                apply=apply,
                counted=counts.secrets_reloaded,
                initial_keys=source.keys,
                conflict=conflict,
            )
        )

    def on_sighup() -> None:
        for source in fixed:
            _secrets_cannot_change(
                source.origin, f"the file {source.name}/{SECRET_FILE_NAME} of BRIDGE_SECRETS_DIR"
            )
        for reloader in reloaders:
            reloader.request()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    for reloader in reloaders:
        app.cleanup_ctx.append(
            lambda _app, reloader=reloader: reloader.watch(settings.secrets_poll_interval)
        )


def _secrets_cannot_change(
    source: SecretSource, file: str = f"the {SECRET_FILE_NAME} file of BRIDGE_SECRETS_DIR"
) -> None:
    logger.warning(
        "SIGHUP received: the webhook secrets come from %s and cannot change while the "
        "bridge runs; put them in %s to reload them, or restart",
        source.description,
        file,
    )


def serve_forever(settings: Settings, secret_source: SecretSource = FIXED_SECRETS) -> int:
    """The ``serve`` command: logging configured, then one process or supervised workers."""
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers == 1:
        return run(serve(settings, secret_source))
    # Each worker sets tracing up for itself; a configuration it would refuse stops the
    # supervisor here, once, rather than every worker with a traceback.
    tracing_from_environment().shutdown()
    return _supervise_workers(settings, secret_source)


def _worker(settings: Settings, supervisor_pid: int, secret_source: SecretSource) -> None:
    configure_logging(settings.log_level, settings.log_format)
    _terminate_with_supervisor(supervisor_pid)
    raise SystemExit(run(serve(settings, secret_source)))


def _terminate_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies (Linux only)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("cannot ask to be stopped with the supervisor: errno %d", ctypes.get_errno())
    # The supervisor may have died before the request took effect.
    if os.getppid() != supervisor_pid:
        logger.error("the supervisor is gone; not starting")
        raise SystemExit(1)


def _supervise_workers(settings: Settings, secret_source: SecretSource) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="webhook-bridge-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = metrics_dir
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = [
        context.Process(
            target=_worker, args=(settings, os.getpid(), secret_source), name=f"worker-{index}"
        )
        for index in range(settings.workers)
    ]
    stopping = False

    def signal_workers(signum: int) -> None:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signum)

    def stop_workers(_signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        signal_workers(signal.SIGTERM)

    def forward_reload(_signum: int, _frame: object) -> None:
        signal_workers(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)
    # Workers inherit "ignore" until their own handler is in place, and their first look
    # at the secrets file comes after that, so a SIGHUP meanwhile misses nothing.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for worker in workers:
        worker.start()
    signal.signal(signal.SIGHUP, forward_reload)
    logger.info(
        "started %d workers on port %s (operations on port %s)",
        len(workers),
        settings.port,
        settings.metrics_port or settings.port,
    )

    unexpected_exit = False
    kill_deadline = float("inf")
    try:
        while any(worker.is_alive() for worker in workers):
            if not stopping and any(worker.exitcode is not None for worker in workers):
                logger.error("a worker exited unexpectedly; stopping the others")
                unexpected_exit = True
                stop_workers()
            if stopping and kill_deadline == float("inf"):
                kill_deadline = time.monotonic() + settings.drain_timeout + KILL_GRACE_SECONDS
            if time.monotonic() > kill_deadline:
                for worker in workers:
                    worker.kill()
            time.sleep(0.2)
        for worker in workers:
            worker.join()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    clean = not unexpected_exit and all(worker.exitcode == 0 for worker in workers)
    return 0 if clean else 1
