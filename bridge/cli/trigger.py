"""``webhook-bridge trigger``: signed sample webhooks sent to a running bridge."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bridge.cli.arguments import (
    Commands,
    add_source_flag,
    add_webhook_secret_file_flag,
    examples,
    key_value,
    webhook_secret_override,
)
from bridge.cli.output import reader_gone
from bridge.events import KNOWN_EVENT_TYPES
from bridge.server import run
from bridge.settings import env_name, load_settings
from bridge.trigger import DEFAULT_URL, SignedWebhook, post_all, sign_samples


def add_parser(commands: Commands) -> None:
    trigger_parser = commands.add_parser(
        "trigger",
        help="send signed sample webhooks to a running bridge",
        description="Sign a sample of each event type with the bridge's secret (the first, if "
        "several) and POST it; print one line per event with the HTTP status and the bridge's "
        "outcome. Exits 1 if any answer was not a 2xx.",
        epilog=examples(
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge trigger --all",
            "webhook-bridge trigger batch.failed --data data.id=batch_123",
            "webhook-bridge trigger response.completed --url https://bridge.example/webhooks/openai",
            "webhook-bridge trigger batch.completed --source staging",
        ),
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
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="set a field of every event, by dotted path (data.id=batch_1); repeatable",
    )
    trigger_parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="the bridge's webhook URL (with --source, its path /NAME is added)",
    )
    add_source_flag(
        trigger_parser,
        "sign with this source's first secret (BRIDGE_SOURCES) and post to its path",
    )
    add_webhook_secret_file_flag(
        trigger_parser, f"sign with the first of these instead of {env_name('webhook_secret')}"
    )
    trigger_parser.add_argument("--json", action="store_true", help="one JSON object per line")
    trigger_parser.set_defaults(handler=_trigger_command)


def _trigger_command(args: argparse.Namespace) -> int:
    if args.all == bool(args.event_types):
        print("webhook-bridge: trigger: give event types or --all", file=sys.stderr)
        return 2
    settings = load_settings(**webhook_secret_override(args))
    url: str = args.url
    if args.webhook_source is not None:
        key = settings.source_named(args.webhook_source).keys[0]
        url = f"{url.rstrip('/')}/{args.webhook_source}"
    elif settings.sources:
        print("webhook-bridge: trigger: BRIDGE_SOURCES is set: give --source NAME", file=sys.stderr)
        return 2
    else:
        key = settings.signing_keys[0]
    event_types = sorted(KNOWN_EVENT_TYPES) if args.all else args.event_types
    try:
        webhooks = sign_samples(event_types, key, overrides=dict(args.data))
    except ValueError as error:
        print(f"webhook-bridge: trigger: {error}", file=sys.stderr)
        return 2
    return run(trigger(url, webhooks, json_lines=args.json))


async def trigger(url: str, webhooks: Sequence[SignedWebhook], *, json_lines: bool) -> int:
    """POST each webhook and print the bridge's answer; 1 if any was not a 2xx."""
    failed = False
    try:
        async for result in post_all(url, webhooks):
            print(result.json_line() if json_lines else result.line(), flush=True)
            failed |= not result.ok
    except BrokenPipeError:
        return reader_gone()
    return 1 if failed else 0
