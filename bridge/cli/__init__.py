"""The ``webhook-bridge`` command: one module per command, each adding its parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version

from bridge.cli import asyncapi, consume, endpoints, hydrate, replay, secret, serve, trigger
from bridge.cli.arguments import CommandParser, examples
from bridge.settings import SettingsError

COMMANDS = (serve, trigger, consume, hydrate, endpoints, replay, secret, asyncapi)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="webhook-bridge",
        description="Verify OpenAI webhooks and publish them to a RabbitMQ topic exchange, "
        "routed by event type.",
        epilog=examples(
            "webhook-bridge serve",
            "webhook-bridge consume 'batch.*' --verify",
            "webhook-bridge trigger --all",
            "webhook-bridge COMMAND --help",
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('openai-webhook-bridge')}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


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
