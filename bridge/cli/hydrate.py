"""``webhook-bridge hydrate``: fetch the object behind each event and publish it."""

from __future__ import annotations

import argparse
import os
import sys

from bridge.cli.arguments import (
    Commands,
    add_broker_flags,
    broker_overrides,
    examples,
    positive_float,
    positive_int,
)
from bridge.extras import MissingExtraError
from bridge.hydrate.service import openai_fetcher, serve_worker
from bridge.hydrate.settings import load_hydrate_settings
from bridge.logs import configure_logging
from bridge.server import run
from bridge.setting_names import check_setting_names
from bridge.settings import default_secrets_dir


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "hydrate",
        help="fetch the full object behind each event and publish it to <exchange>.objects",
        description="Consume <exchange>.hydrate (bound to the event types whose object the "
        "API can return), fetch each event's object with OPENAI_API_KEY and publish the API's "
        "exact bytes to the topic exchange <exchange>.objects, routed by event type; events "
        "whose object cannot be fetched are recorded on <exchange>.objects.failed. Needs the "
        "'hydrate' extra. Settings come from BRIDGE_* variables (see the settings reference) and "
        "OpenAI's own (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_ORG_ID, OPENAI_PROJECT_ID); "
        "SIGTERM finishes the events in hand and exits 0.",
        epilog=examples(
            "OPENAI_API_KEY=sk-... webhook-bridge hydrate",
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge hydrate --rate 20 --concurrency 16",
        ),
    )
    parser.add_argument(
        "--rate", type=positive_float, metavar="N", help="BRIDGE_HYDRATE_RATE: API calls a second"
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="BRIDGE_HYDRATE_CONCURRENCY: events hydrated at once",
    )
    add_broker_flags(parser)
    parser.set_defaults(handler=_hydrate_command)


def _hydrate_command(args: argparse.Namespace) -> int:
    check_setting_names(os.environ, default_secrets_dir())
    overrides = broker_overrides(args)
    if args.rate is not None:
        overrides["hydrate_rate"] = args.rate
    if args.concurrency is not None:
        overrides["hydrate_concurrency"] = args.concurrency
    settings = load_hydrate_settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    try:
        fetcher = openai_fetcher(settings)
    except MissingExtraError as error:
        print(f"webhook-bridge: {error}", file=sys.stderr)
        return 2
    return run(serve_worker(settings, fetcher))
