"""Argument types and flags shared by several commands."""

from __future__ import annotations

import argparse
import typing
from typing import Any, TypeAlias

from yarl import URL

from bridge.secrets import SecretReloadError, read_secrets_argument
from bridge.setting_docs import setting_docs
from bridge.settings import Settings, SettingsError, env_name, load_settings

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns: each command module adds its parser to it."""


_EXAMPLES = "examples:\n"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions but keeps the examples' lines, and shows each flag's default and
    allowed values."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(_EXAMPLES):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
            text += f" (one of: {', '.join(map(str, action.choices))})"
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            default = action.default
            if isinstance(default, list):
                shown = " ".join(default)
            elif isinstance(default, float):
                shown = f"{default:g}"
            else:
                shown = "%(default)s"
            text += f" (default: {shown})"
        return text


class CommandParser(argparse.ArgumentParser):
    """Every command's and action's parser, formatted alike (subparsers inherit the class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        # An abbreviation would take the retired `--webhook-secret VALUE` for
        # `--webhook-secret-file`, and then name the secret in its error.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """One line, as every other refusal of the command is, naming unrecognized flags but
        not the values after them (one may be a secret given the way flags used to take it)."""
        _, _, words = message.partition("unrecognized arguments: ")
        if words:
            flags = [word for word in words.split() if word.startswith("-")]
            message = f"unrecognized arguments: {' '.join(flags) or '(values only)'}"
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def url_without_password(text: str) -> str:
    """A URL flag's value, refused if it holds a password: a command line is visible to
    every user of the machine (``ps``, ``/proc/*/cmdline``) and in a pod's spec."""
    if any(URL(part.strip()).password for part in text.split(",")):
        raise argparse.ArgumentTypeError(
            "a URL given as a flag must not hold a password (the command line is visible "
            "to every process); set it in the environment or in a file in BRIDGE_SECRETS_DIR"
        )
    return text


def add_broker_flags(parser: argparse.ArgumentParser) -> None:
    """``--amqp-url`` and ``--exchange``, overriding their ``BRIDGE_*`` variables."""
    parser.add_argument(
        "--amqp-url",
        type=url_without_password,
        metavar="URL",
        help=f"{env_name('amqp_url')}: the broker, or comma-separated nodes of a cluster "
        "(no password here: give one in the environment or a secrets file)",
    )
    parser.add_argument("--exchange", metavar="NAME", help=f"{env_name('exchange')}: the exchange")


def add_webhook_secret_file_flag(
    parser: argparse._ActionsContainer, help: str, *, repeatable: bool = False
) -> None:
    parser.add_argument(
        "--webhook-secret-file",
        metavar="PATH",
        action="append" if repeatable else "store",
        default=[] if repeatable else None,
        help=f"{help}; the file holds comma-separated whsec_ secrets ('-': standard input)",
    )


def secrets_in_file(given: str) -> str:
    """The comma-separated secrets in the file ``--webhook-secret-file`` names."""
    try:
        return read_secrets_argument(given)
    except SecretReloadError as error:
        raise SettingsError(f"--webhook-secret-file {given}: {error}") from None


def webhook_secret_override(args: argparse.Namespace) -> dict[str, Any]:
    """The ``webhook_secret`` setting from ``--webhook-secret-file``, where given."""
    given: str | None = args.webhook_secret_file
    return {} if given is None else {"webhook_secret": secrets_in_file(given)}


def examples(*lines: str) -> str:
    """An ``epilog`` of example command lines."""
    return _EXAMPLES + "\n".join(f"  {line}" for line in lines)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting, overriding its ``BRIDGE_*`` variable (``--x/--no-x`` for
    a switch), its help showing the setting's default and allowed values."""
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for doc in setting_docs():
        allowed = f"; one of: {', '.join(doc.choices)}" if doc.choices else ""
        described = f": {doc.description}" if doc.description else ""
        text = f"{doc.variable}{described} (default: {doc.default}{allowed})".replace("%", "%%")
        if doc.field == "webhook_secret":
            add_webhook_secret_file_flag(
                group, f"{doc.variable} from this file, re-read whenever it changes"
            )
            continue
        flag = f"--{doc.field.replace('_', '-')}"
        destination = f"setting_{doc.field}"
        if doc.kind == "secret":
            group.add_argument(
                flag, dest=destination, type=url_without_password, metavar="URL", help=text
            )
        elif doc.is_switch:
            group.add_argument(
                flag, dest=destination, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            metavar = "|".join(doc.choices) if doc.choices else "VALUE"
            group.add_argument(flag, dest=destination, metavar=metavar, help=text)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return load_settings(**overrides, **webhook_secret_override(args))


def key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)



def broker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--amqp-url`` and ``--exchange``, where given."""
    return {
        name: getattr(args, name)
        for name in ("amqp_url", "exchange")
        if getattr(args, name) is not None
    }
