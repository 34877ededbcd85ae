"""``webhook-bridge endpoints``: OpenAI's webhook endpoints of the project."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bridge.cli.arguments import Commands, add_source_flag, examples, positive_float
from bridge.endpoints import (
    DEFAULT_TIMEOUT,
    SUBSCRIBABLE_EVENT_TYPES,
    ApiConfig,
    EndpointsClient,
    EndpointsConfigError,
    InstalledSecret,
    OpenAIApiError,
    WebhookEndpoint,
    create_endpoint,
    rotate_endpoint_secret,
)
from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretDestination,
    SecretDestinationError,
    SecretNotWritten,
)
from bridge.server import run
from bridge.settings import SECRETS_DIR_VARIABLE, default_secrets_dir
from bridge.sources import SourceError, check_source_name, source_api_key, source_directory


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "endpoints",
        help="manage OpenAI's webhook endpoints (OPENAI_API_KEY, OPENAI_BASE_URL, "
        "OPENAI_ORG_ID, OPENAI_PROJECT_ID)",
        description="Manage the project's webhook endpoints through OpenAI's API, configured "
        "like OpenAI's SDK: OPENAI_API_KEY (required), OPENAI_BASE_URL, OPENAI_ORG_ID, "
        "OPENAI_PROJECT_ID. A signing secret is never printed: create and rotate-secret write "
        f"it to {SECRETS_DIR_VARIABLE}'s {SECRET_FILE_NAME} file or to --secret-file.",
        epilog=examples(
            "webhook-bridge endpoints list",
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge endpoints create "
            "--url https://bridge.example/webhooks/openai --name production",
            "webhook-bridge endpoints test we_123 --type batch.completed",
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge endpoints rotate-secret we_123 --keep-old",
            "webhook-bridge endpoints --timeout 10 delete we_123 --yes",
            "BRIDGE_SECRETS_DIR=.secrets webhook-bridge endpoints --source staging "
            "rotate-secret we_456 --keep-old",
        ),
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline of each API call",
    )
    add_source_flag(
        parser,
        "manage this source's project (BRIDGE_SOURCES): its API key from OPENAI_API_KEY_<NAME> "
        f"or {SECRETS_DIR_VARIABLE}/NAME/OPENAI_API_KEY, its signing secret written to "
        f"{SECRETS_DIR_VARIABLE}/NAME/{SECRET_FILE_NAME}",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    list_parser = actions.add_parser(
        "list",
        help="list the project's webhook endpoints",
        description="Every endpoint of the project (all pages), newest first.",
    )

    events_help = "'all' (every type OpenAI offers) or event types"
    create_parser = actions.add_parser(
        "create",
        help="create an endpoint and write its signing secret to a file",
        description="Create an endpoint and write its signing secret, alone, to the secrets "
        "file (replaced atomically); the secret is never printed.",
    )
    create_parser.add_argument("--url", required=True, help="the bridge's public HTTPS URL")
    create_parser.add_argument("--name", required=True, help="a name for the endpoint")
    create_parser.add_argument(
        "--events", nargs="+", default=["all"], metavar="TYPE", help=events_help
    )
    _add_secret_file_flag(create_parser)

    update_parser = actions.add_parser(
        "update",
        help="change an endpoint's URL, name or events",
        description="Change what is given; --events replaces the whole list.",
    )
    _add_endpoint_id(update_parser)
    update_parser.add_argument("--url", help="the bridge's public HTTPS URL")
    update_parser.add_argument("--name", help="a name for the endpoint")
    update_parser.add_argument("--events", nargs="+", metavar="TYPE", help=events_help)

    delete_parser = actions.add_parser(
        "delete",
        help="delete an endpoint",
        description="Delete an endpoint: OpenAI stops sending to it. Asks first on a terminal; "
        "elsewhere --yes is required.",
    )
    _add_endpoint_id(delete_parser)
    delete_parser.add_argument("--yes", action="store_true", help="delete without asking")

    test_parser = actions.add_parser(
        "test",
        help="have OpenAI send a sample delivery and print the status it got back",
        description="OpenAI sends one sample delivery of TYPE to the endpoint; exits 1 unless "
        "the endpoint answered a 2xx.",
    )
    _add_endpoint_id(test_parser)
    test_parser.add_argument(
        "--type", required=True, dest="event_type", metavar="TYPE", help="the event type to send"
    )

    rotate_parser = actions.add_parser(
        "rotate-secret",
        help="issue a new signing secret and write it to a file",
        description="OpenAI issues a new signing secret; it is written first in the secrets "
        "file (replaced atomically), never printed. A running bridge picks it up by itself.",
    )
    _add_endpoint_id(rotate_parser)
    rotate_parser.add_argument(
        "--keep-old",
        action="store_true",
        help="OpenAI keeps the previous secret valid for 24 hours; it stays in the file too",
    )
    _add_secret_file_flag(rotate_parser)

    for action_parser, act in (
        (list_parser, _list_endpoints),
        (create_parser, _create_endpoint),
        (update_parser, _update_endpoint),
        (delete_parser, _delete_endpoint),
        (test_parser, _test_endpoint),
        (rotate_parser, _rotate_secret),
    ):
        action_parser.add_argument(
            "--json", action="store_true", help="print one JSON object per line"
        )
        action_parser.set_defaults(handler=_endpoints_command, act=act)


def _add_endpoint_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint_id", metavar="ID", help="the endpoint's id (we_...)")


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
        config = ApiConfig.from_environment(_api_environment(args), timeout=args.timeout)
        return run(_with_client(config, action, args))
    except (EndpointsConfigError, SecretDestinationError, SourceError) as error:
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
        print(_endpoint_json(endpoint) if args.json else _endpoint_line(endpoint))
    if not endpoints:
        print("no webhook endpoints in this project", file=sys.stderr)
    return 0


def _api_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment the API client reads, with ``--source``'s project's key in it."""
    environment = dict(os.environ)
    if args.webhook_source is not None:
        environment["OPENAI_API_KEY"] = source_api_key(
            _check_source(args.webhook_source), default_secrets_dir(), os.environ
        )
    return environment


def _check_source(name: str) -> str:
    try:
        return check_source_name(name)
    except ValueError as error:
        raise SourceError(f"--source: {error}") from None


def _secret_destination(args: argparse.Namespace) -> SecretDestination:
    secrets_dir = os.environ.get(SECRETS_DIR_VARIABLE)
    if args.webhook_source is not None and secrets_dir:
        # Where the running bridge reads (and reloads) that source's secrets.
        secrets_dir = str(source_directory(Path(secrets_dir), args.webhook_source))
    return SecretDestination.choose(args.secret_file, secrets_dir)


async def _create_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    installed = await create_endpoint(
        client,
        _secret_destination(args),
        url=args.url,
        name=args.name,
        event_types=_event_types(args.events),
    )
    if args.json:
        print(_installed_json(installed))
    else:
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
    print(_endpoint_json(endpoint) if args.json else f"updated {_endpoint_line(endpoint)}")
    return 0


async def _delete_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    if not args.yes and not await _confirmed(f"delete webhook endpoint {args.endpoint_id}?"):
        print(f"{args.endpoint_id} not deleted", file=sys.stderr)
        return 1
    deleted = await client.delete(args.endpoint_id)
    if args.json:
        print(deleted.model_dump_json())
    else:
        print(f"deleted {deleted.id}" if deleted.deleted else f"OpenAI did not delete {deleted.id}")
    return 0 if deleted.deleted else 1


async def _confirmed(question: str) -> bool:
    """Ask on the terminal; off a terminal nobody can answer, so --yes is required."""
    if not sys.stdin.isatty():
        raise EndpointsConfigError("not on a terminal: give --yes to delete without asking")
    answer = await asyncio.to_thread(input, f"{question} OpenAI stops sending to it. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def _test_endpoint(client: EndpointsClient, args: argparse.Namespace) -> int:
    result = await client.test(args.endpoint_id, event_type=args.event_type)
    answered_ok = 200 <= result.status_code < 300
    if args.json:
        print(result.model_dump_json())
        return 0 if answered_ok else 1
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
    if args.json:
        print(_installed_json(installed))
        return 0
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


def _endpoint_json(endpoint: WebhookEndpoint) -> str:
    return endpoint.model_dump_json(exclude={"signing_secret"})


def _installed_json(installed: InstalledSecret) -> str:
    """The endpoint, where its new secret was written, and until when the old one is valid."""
    valid_until = installed.old_valid_until
    return json.dumps(
        {
            **installed.endpoint.model_dump(mode="json", exclude={"signing_secret"}),
            "secret_file": str(installed.path),
            "secrets_in_file": installed.secret_count,
            "previous_secret_valid_until": None if valid_until is None else valid_until.isoformat(),
        }
    )
