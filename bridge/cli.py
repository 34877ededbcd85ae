"""The ``webhook-bridge`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq

from bridge.archive import ArchiveFollower, ArchiveNotFoundError
from bridge.consumer import (
    ConsumerSettings,
    Delivery,
    EventConsumer,
    ExchangeNotFoundError,
    WebhookEvent,
)
from bridge.endpoints import (
    DEFAULT_TIMEOUT,
    SUBSCRIBABLE_EVENT_TYPES,
    ApiConfig,
    EndpointsClient,
    EndpointsConfigError,
    OpenAIApiError,
    WebhookEndpoint,
    create_endpoint,
    rotate_endpoint_secret,
)
from bridge.events import KNOWN_EVENT_TYPES
from bridge.logs import configure_logging
from bridge.replay import (
    NAMED_SOURCES,
    Filters,
    ReplayError,
    ReplayOptions,
    ReplaySummary,
    Target,
    parse_when,
    push_summary,
    replay,
)
from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretDestination,
    SecretDestinationError,
    SecretNotWritten,
    locate_secret_source,
)
from bridge.server import run, serve_forever
from bridge.setting_names import check_setting_names
from bridge.settings import (
    SECRETS_DIR_VARIABLE,
    Settings,
    SettingsError,
    default_secrets_dir,
    env_name,
    load_settings,
)
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
    secrets_dir = default_secrets_dir()
    check_setting_names(os.environ, secrets_dir)
    settings = _settings_from(args)
    source = locate_secret_source(
        secrets_dir, os.environ, given_as_flag=args.setting_webhook_secret is not None
    )
    return serve_forever(settings, source)


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
    for name in ("amqp_url", "exchange", "webhook_secret"):
        consume_parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=env_name(name)
        )
    consume_parser.set_defaults(handler=_consume_command)
    _add_endpoints_parser(commands)
    _add_replay_parser(commands)
    return parser


def _add_endpoints_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "endpoints",
        help="manage OpenAI's webhook endpoints (OPENAI_API_KEY, OPENAI_BASE_URL, "
        "OPENAI_ORG_ID, OPENAI_PROJECT_ID)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each API call (default {DEFAULT_TIMEOUT:g})",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    list_parser = actions.add_parser("list", help="list the project's webhook endpoints")
    list_parser.add_argument("--json", action="store_true", help="one JSON object per line")
    list_parser.set_defaults(handler=_endpoints_command, act=_list_endpoints)

    events_help = "'all' (the default for create) or event types; 'all' is every type OpenAI offers"
    create_parser = actions.add_parser(
        "create", help="create an endpoint and write its signing secret to a file"
    )
    create_parser.add_argument("--url", required=True, help="the bridge's public HTTPS URL")
    create_parser.add_argument("--name", required=True, help="a name for the endpoint")
    create_parser.add_argument(
        "--events", nargs="+", default=["all"], metavar="TYPE", help=events_help
    )
    _add_secret_file_flag(create_parser)
    create_parser.set_defaults(handler=_endpoints_command, act=_create_endpoint)

    update_parser = actions.add_parser("update", help="change an endpoint's URL, name or events")
    update_parser.add_argument("endpoint_id", metavar="ID")
    update_parser.add_argument("--url")
    update_parser.add_argument("--name")
    update_parser.add_argument("--events", nargs="+", metavar="TYPE", help=events_help)
    update_parser.set_defaults(handler=_endpoints_command, act=_update_endpoint)

    delete_parser = actions.add_parser("delete", help="delete an endpoint")
    delete_parser.add_argument("endpoint_id", metavar="ID")
    delete_parser.set_defaults(handler=_endpoints_command, act=_delete_endpoint)

    test_parser = actions.add_parser(
        "test", help="have OpenAI send a sample delivery and print the status it got back"
    )
    test_parser.add_argument("endpoint_id", metavar="ID")
    test_parser.add_argument("--type", required=True, dest="event_type", metavar="TYPE")
    test_parser.set_defaults(handler=_endpoints_command, act=_test_endpoint)

    rotate_parser = actions.add_parser(
        "rotate-secret", help="issue a new signing secret and write it to a file"
    )
    rotate_parser.add_argument("endpoint_id", metavar="ID")
    rotate_parser.add_argument(
        "--keep-old",
        action="store_true",
        help="OpenAI keeps the previous secret valid for 24 hours; it stays in the file too",
    )
    _add_secret_file_flag(rotate_parser)
    rotate_parser.set_defaults(handler=_endpoints_command, act=_rotate_secret)


def _add_secret_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        type=Path,
        metavar="PATH",
        help=f"write the signing secret here instead of {SECRETS_DIR_VARIABLE}'s "
        f"{SECRET_FILE_NAME} file",
    )


EndpointsAction = Callable[[EndpointsClient, argparse.Namespace], Awaitable[int]]


def _endpoints_command(args: argparse.Namespace) -> int:
    action: EndpointsAction = args.act
    try:
        config = ApiConfig.from_environment(os.environ, timeout=args.timeout)
        return run(_with_client(config, action, args))
    except (EndpointsConfigError, SecretDestinationError) as error:
        print(f"webhook-bridge: endpoints {args.action}: {error}", file=sys.stderr)
        return 1 if isinstance(error, SecretNotWritten) else 2
    except OpenAIApiError as error:
        print(f"webhook-bridge: endpoints {args.action}: {error.line()}", file=sys.stderr)
        return 1


async def _with_client(config: ApiConfig, action: EndpointsAction, args: argparse.Namespace) -> int:
    async with EndpointsClient(config) as client:
        return await action(client, args)


def _event_types(chosen: Sequence[str]) -> list[str]:
    return list(SUBSCRIBABLE_EVENT_TYPES) if list(chosen) == ["all"] else list(chosen)


def _describe_events(event_types: Sequence[str]) -> str:
    if set(event_types) >= set(SUBSCRIBABLE_EVENT_TYPES):
        return f"all {len(event_types)} event types"
    return ",".join(event_types) or "no event types"


def _endpoint_line(endpoint: WebhookEndpoint) -> str:
    created = datetime.fromtimestamp(endpoint.created_at, tz=UTC)
    return (
        f"{endpoint.id}  {endpoint.name!r}  {endpoint.url}  "
        f"{_describe_events(endpoint.event_types)}  created {created:%Y-%m-%d %H:%M} UTC  "
        f"secret {endpoint.signing_secret_hint or '-'}"
    )


async def _list_endpoints(client: EndpointsClient, args: argparse.Namespace) -> int:
    endpoints = await client.list()
    for endpoint in endpoints:
        print(endpoint.model_dump_json() if args.json else _endpoint_line(endpoint))
    if not endpoints:
        print("no webhook endpoints in this project", file=sys.stderr)
    return 0


def _secret_destination(args: argparse.Namespace) -> SecretDestination:
    return SecretDestination.choose(args.secret_file, os.environ.get(SECRETS_DIR_VARIABLE))


async def _create_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    installed = await create_endpoint(
        client,
        _secret_destination(args),
        url=args.url,
        name=args.name,
        event_types=_event_types(args.events),
    )
    print(f"created {_endpoint_line(installed.endpoint)}")
    print(f"its signing secret is in {installed.path} (not printed)")
    return 0


async def _update_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    if args.url is None and args.name is None and args.events is None:
        raise EndpointsConfigError("nothing to change: give --url, --name or --events")
    endpoint = await client.update(
        args.endpoint_id,
        url=args.url,
        name=args.name,
        event_types=None if args.events is None else _event_types(args.events),
    )
    print(f"updated {_endpoint_line(endpoint)}")
    return 0


async def _delete_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    deleted = await client.delete(args.endpoint_id)
    print(f"deleted {deleted.id}" if deleted.deleted else f"OpenAI did not delete {deleted.id}")
    return 0 if deleted.deleted else 1


async def _test_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    result = await client.test(args.endpoint_id, event_type=args.event_type)
    answered_ok = 200 <= result.status_code < 300
    print(
        f"OpenAI sent a test {result.event_type} to {result.webhook_endpoint_id}; "
        f"the endpoint answered {result.status_code}"
        + ("" if answered_ok else " (not a 2xx: check the bridge's logs)")
    )
    return 0 if answered_ok else 1


async def _rotate_secret(client: EndpointsClient, args: argparse.Namespace) -> int:
    installed = await rotate_endpoint_secret(
        client, _secret_destination(args), args.endpoint_id, keep_old=args.keep_old
    )
    print(
        f"rotated the signing secret of {installed.endpoint.id}: the new one is first of "
        f"{installed.secret_count} in {installed.path} (not printed)"
    )
    if installed.old_valid_until is None:
        print("OpenAI no longer accepts the previous secret: it signs with the new one only")
    else:
        print(
            f"the previous secret stays valid until {installed.old_valid_until:%Y-%m-%d %H:%M} "
            f"UTC; remove it from {installed.path} after that"
        )
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


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


def _broker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--amqp-url`` and ``--exchange``, where given."""
    return {
        name: getattr(args, name)
        for name in ("amqp_url", "exchange")
        if getattr(args, name) is not None
    }


def _consume_command(args: argparse.Namespace) -> int:
    overrides = _broker_overrides(args)
    broker = ConsumerSettings.load(**overrides)
    configure_logging(broker.log_level, broker.log_format)
    verify_secrets: list[str] = []
    if args.verify:
        secret = {"webhook_secret": args.webhook_secret} if args.webhook_secret else {}
        settings = load_settings(**overrides, **secret)
        verify_secrets = settings.webhook_secret.get_secret_value().split(",")
    consumer: EventConsumer | ArchiveFollower
    if args.since is not None:
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
        )
    elif args.until is not None:
        print("webhook-bridge: consume: --until needs --since", file=sys.stderr)
        return 2
    else:
        consumer = EventConsumer(
            broker.amqp_url.get_secret_value(),
            exchange=broker.exchange,
            patterns=args.patterns,
            queue=args.queue,
            verify_secrets=verify_secrets,
        )
    json_lines = args.json or not sys.stdout.isatty()
    return run(consume(consumer, count=args.count, json_lines=json_lines))


async def consume(
    consumer: EventConsumer | ArchiveFollower, *, count: int | None, json_lines: bool
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
    consumer: EventConsumer | ArchiveFollower, *, count: int | None, json_lines: bool
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
        print(
            f"webhook-bridge: {error}; start `webhook-bridge serve` first (it declares it)",
            file=sys.stderr,
        )
        return 1
    except ArchiveNotFoundError as error:
        print(f"webhook-bridge: {error}", file=sys.stderr)
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


_ROUTING_KEY_COLUMN = max(map(len, KNOWN_EVENT_TYPES))


def _event_line(delivery: Delivery, *, json_lines: bool) -> bytes:
    if json_lines:
        # Raw line breaks in valid JSON can only be whitespace between tokens.
        return delivery.body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"
    event = delivery.event
    return (
        f"{datetime.now():%H:%M:%S} {delivery.routing_key:<{_ROUTING_KEY_COLUMN}} {event.id} "
        f"{_subject(event)} {delivery.message_id or '-'}\n"
    ).encode()


def _subject(event: WebhookEvent) -> str:
    """The id of what the event is about: the call, the Live session, else ``data.id``."""
    data = event.data if isinstance(event.data, dict) else event.data.model_dump()
    fields = ("call_id", "session_id", "id")
    return next((str(data[name]) for name in fields if data.get(name) is not None), "-")


def _add_replay_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "replay",
        help="publish stored events again: unrouted, quarantined, dead-lettered or archived",
        description="Re-verify, re-classify and publish stored events again by the routing "
        "policy; each source message is acknowledged only after the broker confirmed its copy.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help=f"{', '.join(NAMED_SOURCES)} (named after {env_name('exchange')}), or a queue name",
    )
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only event types matching this topic pattern ('batch.*', '#.failed'); repeatable",
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only messages timestamped from WHEN (10m, 2h, 7d or an ISO 8601 time)",
    )
    parser.add_argument("--until", metavar="WHEN", help="only messages timestamped up to WHEN")
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="stop after N messages replayed"
    )
    parser.add_argument(
        "--rate", type=_positive_float, metavar="N", help="at most N messages per second"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="read and report; every message stays where it is"
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--to-queue", metavar="NAME", help="publish into this one queue instead of routing"
    )
    target.add_argument(
        "--to-exchange",
        metavar="NAME",
        help="route through this exchange instead of BRIDGE_EXCHANGE; --from archive needs "
        "this or --to-queue (name the main exchange to hand every consumer a second copy)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary object")
    parser.add_argument(
        "--webhook-secret",
        dest="retired_secrets",
        action="append",
        default=[],
        metavar="VALUE",
        help="also accept this (retired) whsec_ secret for this run; repeatable",
    )
    parser.add_argument(
        "--pushgateway",
        metavar="URL",
        help="push webhook_bridge_replay_messages_total to this Prometheus Pushgateway",
    )
    for name in ("amqp_url", "exchange"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=env_name(name)
        )
    parser.set_defaults(handler=_replay_command)


def _replay_command(args: argparse.Namespace) -> int:
    settings = load_settings(**_broker_overrides(args))
    configure_logging(settings.log_level, settings.log_format)
    now = datetime.now(UTC)
    try:
        options = ReplayOptions(
            source=args.source,
            filters=Filters(
                types=tuple(args.types),
                since=None if args.since is None else parse_when(args.since, now),
                until=None if args.until is None else parse_when(args.until, now),
            ),
            target=Target(queue=args.to_queue, exchange=args.to_exchange),
            limit=args.limit,
            rate=args.rate,
            dry_run=args.dry_run,
            extra_secrets=tuple(args.retired_secrets),
        )
    except ValueError as error:
        print(f"webhook-bridge: replay: {error}", file=sys.stderr)
        return 2
    return run(
        replay_and_report(settings, options, json_output=args.json, pushgateway=args.pushgateway)
    )


async def replay_and_report(
    settings: Settings, options: ReplayOptions, *, json_output: bool, pushgateway: str | None
) -> int:
    """Run one replay pass and print its summary: 0, 1 if it stopped early, 2 if it could
    not start."""
    progress = _ProgressBar() if sys.stderr.isatty() and not json_output else None
    try:
        summary = await replay(settings, options, progress=progress)
    except ReplayError as error:
        print(f"webhook-bridge: replay: {error}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.finish()
    print(json.dumps(summary.as_dict()) if json_output else summary.line(), flush=True)
    failed = summary.error is not None
    if pushgateway:
        failed |= not await _push(pushgateway, summary)
    return 1 if failed else 0


async def _push(gateway: str, summary: ReplaySummary) -> bool:
    if summary.dry_run:
        print("webhook-bridge: replay: a dry run pushes nothing", file=sys.stderr)
        return True
    try:
        await asyncio.to_thread(push_summary, gateway, summary)
    except OSError as error:
        print(f"webhook-bridge: replay: cannot push to {gateway}: {error}", file=sys.stderr)
        return False
    return True


class _ProgressBar:
    """One self-rewriting line on stderr, at most ten times a second."""

    _WIDTH = 30

    def __init__(self) -> None:
        self._shown_at = 0.0
        self._shown = False

    def __call__(self, read: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._shown_at < 0.1:
            return
        self._shown_at, self._shown = now, True
        if total:
            filled = self._WIDTH * min(read, total) // total
            bar = f"[{'#' * filled}{'.' * (self._WIDTH - filled)}] {read}/{total}"
        else:
            bar = f"{read} read"
        sys.stderr.write(f"\r{bar}")
        sys.stderr.flush()

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


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
