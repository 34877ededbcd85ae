"""``webhook-bridge hydrate`` as a process: the worker, its operations port, its signals."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from bridge.consumer import IdempotencyStore, InMemoryIdempotencyStore
from bridge.dedup.idempotency import RedisIdempotencyStore
from bridge.hydrate.fetching import Fetcher
from bridge.hydrate.settings import HydrateSettings
from bridge.hydrate.worker import HydrationWorker, operations_app
from bridge.server import listen

logger = logging.getLogger(__name__)

__all__ = ["idempotency_store", "openai_fetcher", "serve_worker"]


def openai_fetcher(settings: HydrateSettings) -> Fetcher:
    """The SDK's client; raises :class:`~bridge.extras.MissingExtraError` without the
    ``hydrate`` extra."""
    from bridge.hydrate.api import OpenAIFetcher

    return OpenAIFetcher(
        settings.api_key_for,
        base_url=settings.openai_base_url,
        organization=settings.openai_organization,
        project=settings.openai_project,
        timeout=settings.hydrate_api_timeout,
    )


def idempotency_store(settings: HydrateSettings) -> IdempotencyStore:
    """Redis shared by every worker when ``BRIDGE_HYDRATE_IDEMPOTENCY_URL`` is set, else
    this process's memory."""
    url = settings.hydrate_idempotency_url.get_secret_value()
    if not url:
        return InMemoryIdempotencyStore()
    return RedisIdempotencyStore(
        url, namespace=settings.names.queue, claim_ttl_seconds=settings.hydrate_claim_ttl
    )


async def serve_worker(settings: HydrateSettings, fetcher: Fetcher) -> int:
    """Hydrate until SIGTERM or SIGINT; exit 0, or 1 with one log line when the worker
    cannot start or the broker's state stops it."""
    store = idempotency_store(settings)
    worker = HydrationWorker(settings, fetcher, idempotency=store)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    runner = web.AppRunner(operations_app(worker), access_log=None, handle_signals=False)
    try:
        if settings.hydrate_metrics_port:
            await runner.setup()
            try:
                sock = listen(
                    settings.hydrate_host,
                    settings.hydrate_metrics_port,
                    reuse_port=False,
                    receive_buffer=None,
                )
            except OSError as error:
                logger.error(
                    "cannot listen on %s:%s: %s",
                    settings.hydrate_host,
                    settings.hydrate_metrics_port,
                    error.strerror,
                )
                return 1
            await web.SockSite(runner, sock).start()
        await worker.run()
    except Exception as error:  # one line for the operator, not a traceback
        logger.error("hydration stopped: %s", str(error) or type(error).__name__)
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        await fetcher.close()
        if isinstance(store, RedisIdempotencyStore):
            await store.close()
    logger.info("stopped")
    return 0
