"""The straightforward way to build the same service: what the bridge is measured against.

Each request: read the body, ``standardwebhooks.Webhook.verify`` (which also
parses the JSON), validate the parsed event with the bridge's own pydantic
union, one confirmed aio-pika publish of the exact bytes to a durable topic
exchange, then 200. It keeps the bridge's delivery guarantees (persistent,
``mandatory``, publisher confirms, a bounded wait) so that the comparison is
about how the work is done, not about doing less of it.

Run: ``BENCH_WEBHOOK_SECRET=whsec_... python -m bench.reference --port 8082 --exchange x``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, ExchangeType
from aiohttp import web
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from bench.serving import serve
from bench.signed_requests import WEBHOOK_PATH
from bridge.events import webhook_event_adapter

SECRET_VARIABLE = "BENCH_WEBHOOK_SECRET"
PUBLISH_TIMEOUT = 5.0

WEBHOOK = web.AppKey("webhook", Webhook)
EXCHANGE = web.AppKey("exchange", AbstractExchange)


async def receive_webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        payload = request.app[WEBHOOK].verify(body, dict(request.headers))
    except WebhookVerificationError as error:
        return web.json_response({"error": str(error)}, status=401)
    try:
        event = webhook_event_adapter.validate_python(payload)
    except ValidationError:
        return web.json_response({"error": "invalid event"}, status=400)
    message = aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=request.headers["webhook-id"],
        content_type="application/json",
        type=event.type,
        timestamp=event.created_at,
        app_id="reference",
        headers={
            "webhook-id": request.headers["webhook-id"],
            "webhook-timestamp": request.headers["webhook-timestamp"],
            "webhook-signature": request.headers["webhook-signature"],
        },
    )
    try:
        await request.app[EXCHANGE].publish(
            message, routing_key=event.type, mandatory=True, timeout=PUBLISH_TIMEOUT
        )
    except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError) as error:
        return web.json_response({"error": repr(error)}, status=503)
    return web.json_response({"outcome": "published"})


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _broker(amqp_url: str, exchange_name: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        app[EXCHANGE] = await channel.declare_exchange(
            exchange_name, ExchangeType.TOPIC, durable=True
        )
        yield
        await connection.close()

    return lifetime


def create_app(secret: str, amqp_url: str, exchange_name: str) -> web.Application:
    app = web.Application()
    app[WEBHOOK] = Webhook(secret)
    app.cleanup_ctx.append(_broker(amqp_url, exchange_name))
    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_VARIABLE, "")
    if not secret:
        parser.error(f"{SECRET_VARIABLE} must hold the whsec_ secret")
    return serve(create_app(secret, args.amqp_url, args.exchange), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
