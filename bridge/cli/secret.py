"""``webhook-bridge secret``: a webhook secret made locally, for trying the bridge out."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bridge.cli.arguments import Commands, examples
from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretDestination,
    SecretDestinationError,
    generate_secret,
    write_secret_file,
)
from bridge.settings import SECRETS_DIR_VARIABLE


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "secret",
        help="make a webhook secret for trying the bridge locally",
        description="Webhook secrets made here are for a local bridge and `trigger`; in "
        "production OpenAI issues the secret (see `endpoints create`).",
        epilog=examples("BRIDGE_SECRETS_DIR=.secrets webhook-bridge secret generate --write"),
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser(
        "generate",
        help="print a new random whsec_ secret, or write it to the secrets file",
        description="A new random whsec_ secret of 32 bytes. Printed on standard output, or "
        f"with --write written to {SECRETS_DIR_VARIABLE}'s {SECRET_FILE_NAME} file (or "
        "--secret-file; the directory is made if missing) atomically, readable by its owner "
        "only, and not printed.",
        epilog=examples(
            'BRIDGE_WEBHOOK_SECRET="$(webhook-bridge secret generate)" webhook-bridge serve',
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge secret generate --write",
        ),
    )
    generate.add_argument(
        "--write", action="store_true", help="write it to the secrets file instead of printing"
    )
    generate.add_argument(
        "--secret-file",
        type=Path,
        metavar="PATH",
        help=f"with --write: this file instead of {SECRETS_DIR_VARIABLE}'s {SECRET_FILE_NAME}",
    )
    generate.add_argument(
        "--force", action="store_true", help="with --write: replace a file that holds secrets"
    )
    generate.set_defaults(handler=_generate_command)


def _generate_command(args: argparse.Namespace) -> int:
    secret = generate_secret()
    if not args.write:
        if args.secret_file is not None or args.force:
            print(
                "webhook-bridge: secret generate: --secret-file and --force go with --write",
                file=sys.stderr,
            )
            return 2
        print(secret)
        return 0
    try:
        destination = SecretDestination.choose(
            args.secret_file, os.environ.get(SECRETS_DIR_VARIABLE)
        )
        if destination.path.exists() and not args.force:
            raise SecretDestinationError(
                f"{destination.path} exists: a new secret would lock out the senders that use "
                "the one in it; give --force to replace it"
            )
        # A directory made here holds secrets: only its owner may list it.
        destination.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        destination.secrets_to_keep(keep_old=False)
        write_secret_file(destination.path, [secret])
    except (SecretDestinationError, OSError) as error:
        print(f"webhook-bridge: secret generate: {error}", file=sys.stderr)
        return 2
    print(f"wrote a new webhook secret to {destination.path} (not printed)", file=sys.stderr)
    return 0
