"""Serving the comparison apps under the same conditions as the bridge.

Same event loop (uvloop, as ``bridge.server.run`` uses), no access log, the same
listen backlog, and a clean stop on SIGTERM, so that differences in the
results come from the request path and not from how the process is run.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import uvloop
from aiohttp import web

BACKLOG = 1024


def serve(
    app: web.Application,
    host: str,
    port: int,
    prepare: Callable[[web.Server], None] = lambda _server: None,
) -> int:
    """Serve ``app`` until SIGTERM or SIGINT; ``prepare`` sees its server before it listens."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_until_signalled(app, host, port, prepare))


async def _serve_until_signalled(
    app: web.Application, host: str, port: int, prepare: Callable[[web.Server], None]
) -> int:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    prepare(runner.server)
    site = web.TCPSite(runner, host, port, backlog=BACKLOG)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
