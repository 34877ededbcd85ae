"""``webhook-bridge replay``: publish stored events again."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from bridge.cli.arguments import (
    Commands,
    add_broker_flags,
    add_source_flag,
    add_webhook_secret_file_flag,
    broker_overrides,
    examples,
    positive_float,
    positive_int,
    secrets_in_file,
)
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
from bridge.server import run
from bridge.settings import Settings, env_name, load_settings


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "replay",
        help="publish stored events again: unrouted, quarantined, dead-lettered or archived",
        description="Re-verify, re-classify and publish stored events again by the routing "
        "policy; each source message is acknowledged only after the broker confirmed its copy.",
        epilog=examples(
            "webhook-bridge replay --from unrouted --dry-run",
            "webhook-bridge replay --from unrouted --type 'batch.*'",
            "webhook-bridge replay --from archive --since 1d --type 'batch.*' --to-queue billing",
            "webhook-bridge replay --from quarantine --limit 10 --json",
        ),
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
    add_source_flag(parser, "only messages of this source (the x-webhook-source header)")
    parser.add_argument(
        "--limit", type=positive_int, metavar="N", help="stop after N messages replayed"
    )
    parser.add_argument(
        "--rate", type=positive_float, metavar="N", help="at most N messages per second"
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
    add_webhook_secret_file_flag(
        parser, "also accept these (retired) secrets for this run; repeatable", repeatable=True
    )
    parser.add_argument(
        "--pushgateway",
        metavar="URL",
        help="push webhook_bridge_replay_messages_total to this Prometheus Pushgateway",
    )
    add_broker_flags(parser)
    parser.set_defaults(handler=_replay_command)


def _replay_command(args: argparse.Namespace) -> int:
    settings = load_settings(**broker_overrides(args))
    configure_logging(settings.log_level, settings.log_format)
    now = datetime.now(UTC)
    try:
        options = ReplayOptions(
            source=args.source,
            filters=Filters(
                types=tuple(args.types),
                since=None if args.since is None else parse_when(args.since, now),
                until=None if args.until is None else parse_when(args.until, now),
                source=args.webhook_source,
            ),
            target=Target(queue=args.to_queue, exchange=args.to_exchange),
            limit=args.limit,
            rate=args.rate,
            dry_run=args.dry_run,
            extra_secrets=tuple(
                secret
                for given in args.webhook_secret_file
                for secret in secrets_in_file(given).split(",")
            ),
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
