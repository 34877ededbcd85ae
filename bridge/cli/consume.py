"""``webhook-bridge consume``: print the events arriving for binding patterns."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime

import aiormq

from bridge.archive import ArchiveFollower, ArchiveNotFoundError
from bridge.cli.arguments import (
    Commands,
    add_broker_flags,
    add_source_flag,
    add_webhook_secret_file_flag,
    broker_overrides,
    examples,
    positive_int,
    webhook_secret_override,
)
from bridge.cli.output import reader_gone
from bridge.consumer import (
    ConsumerSettings,
    Delivery,
    EventConsumer,
    ExchangeNotFoundError,
    ObjectConsumer,
    ObjectDelivery,
    VerifySecrets,
    WebhookEvent,
)
from bridge.events import KNOWN_EVENT_TYPES
from bridge.logs import configure_logging
from bridge.replay import parse_when
from bridge.server import run
from bridge.settings import env_name, load_settings
from bridge.sources import check_source_name, source_exchange_name


def add_parser(commands: Commands) -> None:
    consume_parser = commands.add_parser(
        "consume",
        help="print the events arriving on the exchange for binding patterns",
        description="Bind a queue to the exchange with the binding patterns and print each event "
        "as it arrives: a summary line on a terminal, the exact body as one JSON line when "
        "piped or with --json. Ctrl-C and SIGTERM exit 0.",
        epilog=examples(
            "webhook-bridge consume '#'",
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge consume 'batch.*' --verify --count 1",
            "webhook-bridge consume '#.failed' | jq -r '.type + \" \" + .data.id'",
            "webhook-bridge consume 'response.*' --since 2h",
            "webhook-bridge consume 'batch.*' --source prod",
            "webhook-bridge consume --objects 'batch.*'",
        ),
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
        "--count", type=positive_int, metavar="N", help="exit after N events"
    )
    consume_parser.add_argument(
        "--json",
        action="store_true",
        help="print each message body as one JSON line (the default when stdout is not a terminal)",
    )
    consume_parser.add_argument(
        "--objects",
        action="store_true",
        help="print the objects `webhook-bridge hydrate` fetched for the events (from "
        "<exchange>.objects) instead of the events",
    )
    consume_parser.add_argument(
        "--verify",
        action="store_true",
        help=f"re-check OpenAI's signature with {env_name('webhook_secret')}; drop forgeries",
    )
    consume_parser.add_argument(
        "--since",
        metavar="WHEN",
        help="first print the archived events from WHEN on (10m, 2h, 7d or an ISO 8601 time), "
        "then follow live ones; needs the archive stream",
    )
    consume_parser.add_argument(
        "--until",
        metavar="WHEN",
        help="with --since: only events up to WHEN; exit once the clock passes it",
    )
    add_source_flag(
        consume_parser,
        "only this source's events (BRIDGE_SOURCES): live from its exchange "
        "<exchange>.source.NAME, from the archive by the x-webhook-source header",
    )
    secret_variable = env_name("webhook_secret")
    add_webhook_secret_file_flag(
        consume_parser, f"with --verify: check against these instead of {secret_variable}"
    )
    add_broker_flags(consume_parser)
    consume_parser.set_defaults(handler=_consume_command)


def _consume_command(args: argparse.Namespace) -> int:
    overrides = broker_overrides(args)
    broker = ConsumerSettings.load(**overrides)
    configure_logging(broker.log_level, broker.log_format)
    source: str | None = args.webhook_source
    if source is not None:
        try:
            check_source_name(source)
        except ValueError as error:
            print(f"webhook-bridge: consume: --source: {error}", file=sys.stderr)
            return 2
    verify_secrets: VerifySecrets = []
    if args.verify:
        settings = load_settings(**overrides, **webhook_secret_override(args))
        verify_secrets = settings.verification_secrets(source=source)
    consumer: EventConsumer | ArchiveFollower | ObjectConsumer
    if args.objects:
        if args.verify or args.since is not None or args.until is not None or source is not None:
            print(
                "webhook-bridge: consume: --objects reads objects, which carry no signature, "
                "are not archived and share one exchange across sources; not with --verify, "
                "--since, --until or --source",
                file=sys.stderr,
            )
            return 2
        consumer = ObjectConsumer(
            broker.amqp_url.get_secret_value(),
            exchange=broker.exchange,
            patterns=args.patterns,
            queue=args.queue,
            ca_file=broker.amqp_ca_file,
        )
    elif args.since is not None:
        if args.queue is not None:
            print(
                "webhook-bridge: consume: --since reads the archive; not with --queue",
                file=sys.stderr,
            )
            return 2
        try:
            now = datetime.now(UTC)
            since = parse_when(args.since, now)
            until = None if args.until is None else parse_when(args.until, now)
        except ValueError as error:
            print(f"webhook-bridge: consume: {error}", file=sys.stderr)
            return 2
        consumer = ArchiveFollower(
            broker.amqp_url.get_secret_value(),
            exchange=broker.exchange,
            patterns=args.patterns,
            since=since,
            until=until,
            verify_secrets=verify_secrets,
            source=source,
            ca_file=broker.amqp_ca_file,
        )
    elif args.until is not None:
        print("webhook-bridge: consume: --until needs --since", file=sys.stderr)
        return 2
    else:
        consumer = EventConsumer(
            broker.amqp_url.get_secret_value(),
            exchange=broker.exchange
            if source is None
            else source_exchange_name(broker.exchange, source),
            patterns=args.patterns,
            queue=args.queue,
            verify_secrets=verify_secrets,
            ca_file=broker.amqp_ca_file,
            heartbeat=broker.amqp_heartbeat,
        )
    json_lines = args.json or not sys.stdout.isatty()
    return run(consume(consumer, count=args.count, json_lines=json_lines))


async def consume(
    consumer: EventConsumer | ArchiveFollower | ObjectConsumer,
    *,
    count: int | None,
    json_lines: bool,
) -> int:
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


async def _print_events(
    consumer: EventConsumer | ArchiveFollower | ObjectConsumer,
    *,
    count: int | None,
    json_lines: bool,
) -> int:
    try:
        async with consumer:
            patterns = " ".join(repr(pattern) for pattern in consumer.patterns)
            queue, exchange = consumer.queue_name, consumer.exchange
            source = (
                f"reading the archive {queue}, then live events, matching"
                if isinstance(consumer, ArchiveFollower)
                else f"consuming from {queue} bound to {exchange} with"
            )
            print(f"{source} {patterns}", file=sys.stderr, flush=True)
            received = 0
            async for delivery in consumer:
                sys.stdout.buffer.write(_event_line(delivery, json_lines=json_lines))
                sys.stdout.buffer.flush()
                await delivery.ack()
                received += 1
                if received == count:
                    break
    except ExchangeNotFoundError as error:
        declarer = "hydrate" if isinstance(consumer, ObjectConsumer) else "serve"
        print(
            f"webhook-bridge: {error}; start `webhook-bridge {declarer}` first (it declares it)",
            file=sys.stderr,
        )
        return 1
    except ArchiveNotFoundError as error:
        print(f"webhook-bridge: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return reader_gone()
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        print(f"webhook-bridge: cannot consume from the broker: {reason}", file=sys.stderr)
        return 1
    return 0


_ROUTING_KEY_COLUMN = max(map(len, KNOWN_EVENT_TYPES))


def _event_line(delivery: Delivery | ObjectDelivery, *, json_lines: bool) -> bytes:
    if json_lines:
        # Raw line breaks in valid JSON can only be whitespace between tokens.
        return delivery.body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"
    if isinstance(delivery, ObjectDelivery):
        return _object_line(delivery)
    event = delivery.event
    return (
        f"{datetime.now():%H:%M:%S} {delivery.routing_key:<{_ROUTING_KEY_COLUMN}} {event.id} "
        f"{_subject(event)} {delivery.message_id or '-'}\n"
    ).encode()


def _object_line(delivery: ObjectDelivery) -> bytes:
    obj = delivery.object
    object_id = obj.get("id") if isinstance(obj, dict) else getattr(obj, "id", None)
    stale = " stale" if delivery.stale else ""
    return (
        f"{datetime.now():%H:%M:%S} {delivery.routing_key:<{_ROUTING_KEY_COLUMN}} "
        f"{delivery.object_type or '-'} {object_id or '-'} {delivery.message_id or '-'}{stale}\n"
    ).encode()


def _subject(event: WebhookEvent) -> str:
    """The id of what the event is about: the call, the Live session, else ``data.id``."""
    data = event.data if isinstance(event.data, dict) else event.data.model_dump()
    fields = ("call_id", "session_id", "id")
    return next((str(data[name]) for name in fields if data.get(name) is not None), "-")
