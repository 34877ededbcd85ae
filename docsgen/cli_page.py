"""docs/reference/cli.md: every command, subcommand and flag, from the argparse parser."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from bridge.cli import build_parser
from docsgen.markdown import code, page, prose, table

USAGE_WIDTH = 88


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    """The words after ``webhook-bridge``: ``("endpoints", "create")``."""

    parser: argparse.ArgumentParser
    help: str | None

    @property
    def anchor(self) -> str:
        return "-".join(self.words) or "webhook-bridge"

    @property
    def name(self) -> str:
        return " ".join(("webhook-bridge", *self.words))


def commands(parser: argparse.ArgumentParser | None = None) -> list[Command]:
    """The program and every command under it, depth first, in the parser's order."""
    root = parser or build_parser()
    return [Command((), root, root.description), *_subcommands(root, ())]


def _subcommands(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> Iterator[Command]:
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, subparser in action.choices.items():
            command = Command((*words, name), subparser, subparser.description or helps.get(name))
            yield command
            yield from _subcommands(subparser, command.words)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return code(action.metavar or action.dest)
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return code(flags)
    metavar = action.metavar or action.dest.upper()
    return code(f"{flags} {metavar}")


def _default(action: argparse.Action) -> str:
    if action.required and action.nargs not in (argparse.ZERO_OR_MORE, argparse.OPTIONAL):
        return "(required)"
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return ""
    if isinstance(action.default, list):
        return code(" ".join(str(value) for value in action.default))
    return code(action.default)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return prose(parser._get_formatter()._expand_help(action))


def _arguments_table(parser: argparse.ArgumentParser) -> str:
    actions = [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
    ]
    if not actions:
        return ""
    with_choices = any(action.choices for action in actions)
    headings = ["Argument", "Meaning", "Default", *(["Choices"] if with_choices else [])]
    rows = [
        [
            _argument(action),
            _help(parser, action),
            _default(action),
            *([", ".join(code(choice) for choice in action.choices or ())] if with_choices else []),
        ]
        for action in actions
    ]
    return table(headings, rows)


def _section(command: Command) -> str:
    level = "##" if len(command.words) <= 1 else "###"
    summary = prose(command.help)
    parts = [
        f"{level} `{command.name}` {{#{command.anchor}}}",
        summary[:1].upper() + summary[1:],
        f"```text\n{_usage(command.parser)}\n```",
        _arguments_table(command.parser),
    ]
    return "\n\n".join(part for part in parts if part)


def render() -> str:
    found = commands()
    index = table(
        ("Command", "What it does"),
        ([f"[`{command.name}`](#{command.anchor})", prose(command.help)] for command in found[1:]),
    )
    return page(
        "Command line",
        "One program, `webhook-bridge`, with a command per task. Every command takes `--help`. "
        "Settings also come from the environment: see [settings](settings.md).",
        index,
        *(_section(command) for command in found),
    )
