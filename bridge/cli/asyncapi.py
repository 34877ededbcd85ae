"""``webhook-bridge asyncapi``: the AsyncAPI 3.0 document of what the bridge publishes."""

from __future__ import annotations

import argparse
import sys

from bridge.asyncapi import asyncapi_document, render
from bridge.cli.arguments import Commands, examples
from bridge.consumer import ConsumerSettings
from bridge.settings import env_name


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of the messages the bridge publishes",
        description="Print, as JSON, the AsyncAPI 3.0 document of the exchanges and queues the "
        "bridge publishes to and of every message: the event types' payload schemas, the AMQP "
        "headers and properties.",
        epilog=examples(
            "webhook-bridge asyncapi > asyncapi.json",
            "BRIDGE_EXCHANGE=billing.webhooks webhook-bridge asyncapi",
        ),
    )
    parser.add_argument(
        "--exchange",
        metavar="VALUE",
        help=f"{env_name('exchange')}: the topic exchange the other names derive from",
    )
    parser.set_defaults(handler=_asyncapi_command)


def _asyncapi_command(args: argparse.Namespace) -> int:
    overrides = {} if args.exchange is None else {"exchange": args.exchange}
    exchange = ConsumerSettings.load(**overrides).exchange
    sys.stdout.write(render(asyncapi_document(exchange)))
    return 0
