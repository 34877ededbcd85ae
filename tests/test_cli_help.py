"""The command line explains itself: version, descriptions, examples, defaults, choices;
and ``secret generate`` makes a usable webhook secret."""

from __future__ import annotations

import argparse
import stat
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from bridge import cli
from bridge.cli.arguments import settings_from
from bridge.secrets import SECRET_FILE_NAME, read_secret_file
from bridge.setting_docs import setting_docs
from bridge.settings import Settings
from bridge.signature import decode_secret


def command_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and action parser, with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from command_parsers(child, (*path, name))


PARSERS = dict(command_parsers(cli.build_parser()))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"webhook-bridge {version('openai-webhook-bridge')}\n"


@pytest.mark.parametrize("path", sorted(PARSERS), ids=lambda path: " ".join(path) or "top")
def test_every_command_describes_itself(path: tuple[str, ...]) -> None:
    parser = PARSERS[path]
    assert parser.description, f"`{' '.join(path)}` has no description"
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"`{' '.join(path)}` {action.option_strings or action.dest}"
    if len(path) <= 1:
        assert (parser.epilog or "").startswith("examples:"), path


def test_help_shows_defaults_and_allowed_values() -> None:
    serve_help = " ".join(PARSERS[("serve",)].format_help().split())
    for doc in setting_docs():
        flag = f"--{doc.field.replace('_', '-')}"
        assert flag in serve_help
        assert doc.variable in serve_help
    assert "(default: 8080)" in serve_help
    assert "one of: quorum, classic" in serve_help
    assert "--no-declare-topology" in serve_help
    trigger_help = " ".join(PARSERS[("trigger",)].format_help().split())
    assert "(default: http://localhost:8080/webhooks/openai)" in trigger_help
    assert "(default: 30)" in PARSERS[("endpoints",)].format_help()
    # The examples keep their lines.
    assert "\n  webhook-bridge replay --from unrouted --dry-run\n" in (
        PARSERS[("replay",)].format_help()
    )


def test_switch_settings_take_no_prefixed_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", "whsec_" + "A" * 44)
    parser = cli.build_parser()

    def declares(*flags: str) -> bool:
        return settings_from(parser.parse_args(["serve", *flags])).declare_topology

    assert declares("--no-declare-topology") is False
    monkeypatch.setenv("BRIDGE_DECLARE_TOPOLOGY", "false")
    assert declares("--declare-topology") is True
    assert declares() is False


def test_every_setting_is_documented() -> None:
    assert [doc.field for doc in setting_docs()] == list(Settings.model_fields)
    assert all(doc.description for doc in setting_docs())
    defaults = {doc.variable: doc.default for doc in setting_docs()}
    assert defaults["BRIDGE_WEBHOOK_SECRET"] == "(required)"
    assert defaults["BRIDGE_AMQP_URL"] == "amqp://guest:***@localhost:5672/"
    assert defaults["BRIDGE_SECRETS_POLL_INTERVAL"] == "2"


def test_secret_generate_prints_a_usable_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["secret", "generate"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli.main(["secret", "generate"]) == 0
    second = capsys.readouterr().out.strip()
    assert first != second
    assert len(decode_secret(first)) == 32
    assert first.startswith("whsec_")


def test_secret_generate_writes_the_secrets_file_and_never_prints_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    directory = tmp_path / "new" / ".secrets"
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(directory))
    assert cli.main(["secret", "generate", "--write"]) == 0
    written = directory / SECRET_FILE_NAME
    (key,) = read_secret_file(written)
    assert len(key) == 32
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    printed = capsys.readouterr()
    assert printed.out == ""
    assert written.read_text().strip().removeprefix("whsec_")[:12] not in printed.err

    assert cli.main(["secret", "generate", "--write"]) == 2
    assert "--force" in capsys.readouterr().err
    assert read_secret_file(written) == (key,)
    assert cli.main(["secret", "generate", "--write", "--force"]) == 0
    assert read_secret_file(written) != (key,)


def test_secret_generate_write_needs_a_destination(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BRIDGE_SECRETS_DIR", raising=False)
    assert cli.main(["secret", "generate", "--write"]) == 2
    assert "BRIDGE_SECRETS_DIR" in capsys.readouterr().err
    chosen = tmp_path / "secret"
    assert cli.main(["secret", "generate", "--write", "--secret-file", str(chosen)]) == 0
    assert len(read_secret_file(chosen)) == 1
    assert cli.main(["secret", "generate", "--secret-file", str(chosen)]) == 2
