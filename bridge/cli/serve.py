"""``webhook-bridge serve``: the HTTP ingress."""

from __future__ import annotations

import argparse
import os

from bridge.cli.arguments import Commands, add_setting_flags, examples, settings_from
from bridge.secrets import locate_secret_source
from bridge.server import serve_forever
from bridge.setting_names import check_setting_names
from bridge.settings import default_secrets_dir


def _serve_command(args: argparse.Namespace) -> int:
    secrets_dir = default_secrets_dir()
    check_setting_names(os.environ, secrets_dir)
    settings = settings_from(args)
    source = locate_secret_source(secrets_dir, os.environ, flag_file=args.webhook_secret_file)
    return serve_forever(settings, source)


def add_parser(commands: Commands) -> None:
    serve_parser = commands.add_parser(
        "serve",
        help="run the HTTP ingress",
        description="Receive OpenAI's webhooks on POST /webhooks/openai (with BRIDGE_SOURCES, "
        "POST /webhooks/openai/<source> for each project), verify each, and "
        "publish it to the topic exchange; answer 2xx only after the broker confirmed. Every "
        "setting is read from its BRIDGE_* variable or a file in BRIDGE_SECRETS_DIR; a flag "
        "overrides it.",
        epilog=examples(
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge serve",
            "BRIDGE_AMQP_URL=amqp://rabbit-0:5672/,amqp://rabbit-1:5672/ webhook-bridge serve",
            "webhook-bridge serve --port 9000 --log-format json",
            "BRIDGE_SOURCES=prod,staging BRIDGE_SECRETS_DIR=.sources webhook-bridge serve",
        ),
    )
    add_setting_flags(serve_parser)
    serve_parser.set_defaults(handler=_serve_command)
