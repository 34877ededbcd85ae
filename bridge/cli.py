"""The ``webhook-bridge`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime

import aiormq

from bridge.consumer import (
    ConsumerSettings,
    Delivery,
    EventConsumer,
    ExchangeNotFoundError,
    WebhookEvent,
)
from bridge.events import KNOWN_EVENT_TYPES, RealtimeCallData, ResourceData
from bridge.logs import configure_logging
from bridge.server import run, serve_forever
from bridge.settings import Settings, SettingsError, env_name, load_settings
from bridge.trigger import DEFAULT_URL, SignedWebhook, post_all, sign_samples

logger = logging.getLogger(__name__)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting, overriding its ``BRIDGE_*`` variable."""
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for name, field in Settings.model_fields.items():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"setting_{name}",
            metavar="VALUE",
            help=f"{env_name(name)}" + (f": {field.description}" if field.description else ""),
        )


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return load_settings(**overrides)


def _serve_command(args: argparse.Namespace) -> int:
    return serve_forever(_settings_from(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhook-bridge",
        description="Verify OpenAI webhooks and publish them to a RabbitMQ topic exchange.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the HTTP ingress")
    _add_setting_flags(serve_parser)
    serve_parser.set_defaults(handler=_serve_command)

    trigger_parser = commands.add_parser(
        "trigger", help="send signed sample webhooks to a running bridge"
    )
    trigger_parser.add_argument(
        "event_types", nargs="*", metavar="TYPE", help="event type, e.g. batch.completed"
    )
    trigger_parser.add_argument(
        "--all", action="store_true", help="send one event of every known type, sorted by type"
    )
    trigger_parser.add_argument(
        "--data",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="set a field of every event, by dotted path (data.id=batch_1); repeatable",
    )
    trigger_parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the bridge's webhook URL (default {DEFAULT_URL})"
    )
    trigger_parser.add_argument(
        "--webhook-secret",
        metavar="VALUE",
        help=f"{env_name('webhook_secret')}: sign with this secret (the first, if several)",
    )
    trigger_parser.add_argument("--json", action="store_true", help="one JSON object per line")
    trigger_parser.set_defaults(handler=_trigger_command)

    consume_parser = commands.add_parser(
        "consume", help="print the events arriving on the exchange for binding patterns"
    )
    consume_parser.add_argument(
        "patterns", nargs="+", metavar="PATTERN", help="binding pattern: '#', 'batch.*', '#.failed'"
    )
    consume_parser.add_argument(
        "--queue",
        metavar="NAME",
        help="use (and create if needed) this durable queue instead of a temporary one",
    )
    consume_parser.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after N events"
    )
    consume_parser.add_argument(
        "--json",
        action="store_true",
        help="print each message body as one JSON line (the default when stdout is not a terminal)",
    )
    consume_parser.add_argument(
        "--verify",
        action="store_true",
        help=f"re-check OpenAI's signature with {env_name('webhook_secret')}; drop forgeries",
    )
    for name in ("amqp_url", "exchange", "webhook_secret"):
        consume_parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=env_name(name)
        )
    consume_parser.set_defaults(handler=_consume_command)
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _trigger_command(args: argparse.Namespace) -> int:
    if args.all == bool(args.event_types):
        print("webhook-bridge: trigger: give event types or --all", file=sys.stderr)
        return 2
    secret = {"webhook_secret": args.webhook_secret} if args.webhook_secret else {}
    key = load_settings(**secret).signing_keys[0]
    event_types = sorted(KNOWN_EVENT_TYPES) if args.all else args.event_types
    try:
        webhooks = sign_samples(event_types, key, overrides=dict(args.data))
    except ValueError as error:
        print(f"webhook-bridge: trigger: {error}", file=sys.stderr)
        return 2
    return run(trigger(args.url, webhooks, json_lines=args.json))


async def trigger(url: str, webhooks: Sequence[SignedWebhook], *, json_lines: bool) -> int:
    """POST each webhook and print the bridge's answer; 1 if any was not a 2xx."""
    failed = False
    async for result in post_all(url, webhooks):
        print(result.json_line() if json_lines else result.line(), flush=True)
        failed |= not result.ok
    return 1 if failed else 0


def _consume_command(args: argparse.Namespace) -> int:
    overrides = {
        name: getattr(args, name)
        for name in ("amqp_url", "exchange")
        if getattr(args, name) is not None
    }
    broker = ConsumerSettings.load(**overrides)
    configure_logging(broker.log_level, broker.log_format)
    verify_secrets: list[str] = []
    if args.verify:
        secret = {"webhook_secret": args.webhook_secret} if args.webhook_secret else {}
        settings = load_settings(**overrides, **secret)
        verify_secrets = settings.webhook_secret.get_secret_value().split(",")
    consumer = EventConsumer(
        broker.amqp_url.get_secret_value(),
        exchange=broker.exchange,
        patterns=args.patterns,
        queue=args.queue,
        verify_secrets=verify_secrets,
    )
    json_lines = args.json or not sys.stdout.isatty()
    return run(consume(consumer, count=args.count, json_lines=json_lines))


async def consume(consumer: EventConsumer, *, count: int | None, json_lines: bool) -> int:
    """Print events until ``count`` of them arrived, or until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    printing = asyncio.create_task(_print_events(consumer, count=count, json_lines=json_lines))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({printing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    printing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await printing
    return 0


async def _print_events(consumer: EventConsumer, *, count: int | None, json_lines: bool) -> int:
    try:
        async with consumer:
            patterns = " ".join(repr(pattern) for pattern in consumer.patterns)
            queue, exchange = consumer.queue_name, consumer.exchange
            print(
                f"consuming from {queue} bound to {exchange} with {patterns}",
                file=sys.stderr,
                flush=True,
            )
            received = 0
            async for delivery in consumer:
                sys.stdout.buffer.write(_event_line(delivery, json_lines=json_lines))
                sys.stdout.buffer.flush()
                await delivery.ack()
                received += 1
                if received == count:
                    break
    except ExchangeNotFoundError as error:
        print(
            f"webhook-bridge: {error}; start `webhook-bridge serve` first (it declares it)",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`); silence the interpreter's final flush too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        print(f"webhook-bridge: cannot consume from the broker: {reason}", file=sys.stderr)
        return 1
    return 0


def _event_line(delivery: Delivery, *, json_lines: bool) -> bytes:
    if json_lines:
        # Raw line breaks in valid JSON can only be whitespace between tokens.
        return delivery.body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"
    event = delivery.event
    return (
        f"{datetime.now():%H:%M:%S} {delivery.routing_key:<25} {event.id} "
        f"{_subject(event)} {delivery.message_id or '-'}\n"
    ).encode()


def _subject(event: WebhookEvent) -> str:
    """The id of what the event is about: the batch, job, run, response or call."""
    data = event.data
    if isinstance(data, RealtimeCallData):
        return data.call_id
    if isinstance(data, ResourceData):
        return data.id
    return str(data.get("id", data.get("call_id", "-")))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SettingsError as error:
        print(f"webhook-bridge: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
