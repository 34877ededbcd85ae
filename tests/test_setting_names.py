"""A typo in a setting's name stops ``serve`` instead of running with the default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.setting_names import check_setting_names, valid_setting_names
from bridge.settings import Settings, SettingsError, env_name
from tests.conftest import free_port, new_secret


def serve(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--port", "0"],
        env=base | environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_every_setting_and_the_secrets_dir_are_valid_names() -> None:
    names = valid_setting_names()
    assert {env_name(field) for field in Settings.model_fields} <= names
    assert "BRIDGE_SECRETS_DIR" in names
    assert "BRIDGE_DEDUP_WINDOW" in names


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("BRIDGE_DEDUP_WINDOWS", "BRIDGE_DEDUP_WINDOW"),
        ("BRIDGE_EXCHANGES", "BRIDGE_EXCHANGE"),
        ("BRIDGE_WEBHOOK_SECRETS", "BRIDGE_WEBHOOK_SECRET"),
        ("BRIDGE_SECRET_DIR", "BRIDGE_SECRETS_DIR"),
        ("bridge_log_levle", "BRIDGE_LOG_LEVEL"),
    ],
)
def test_an_unknown_variable_names_the_closest_setting(
    name: str, closest: str, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError) as error:
        check_setting_names({name: "60", "BRIDGE_EXCHANGE": "x"}, tmp_path)
    assert str(error.value) == (
        f"unknown setting: environment variable {name}; did you mean {closest}?"
    )


def test_a_name_like_no_setting_says_so(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="BRIDGE_ZZZZZZZZZZZZ; no setting has a similar"):
        check_setting_names({"BRIDGE_ZZZZZZZZZZZZ": "1"}, tmp_path)


def test_other_variables_and_hidden_entries_are_not_settings(tmp_path: Path) -> None:
    (tmp_path / "..data").mkdir()
    (tmp_path / "..2026_12_01_08_00_00.123456789").mkdir()
    (tmp_path / "BRIDGE_WEBHOOK_SECRET").write_text(new_secret())
    (tmp_path / "bridge_amqp_url").write_text("amqp://localhost/")
    check_setting_names({"PATH": "/bin", "OPENAI_API_KEY": "x", "RABBITMQ_BRIDGE": "y"}, tmp_path)
    check_setting_names({}, tmp_path / "missing")


def test_an_unknown_file_in_the_secrets_dir_names_the_closest_setting(tmp_path: Path) -> None:
    (tmp_path / "BRIDGE_WEBHOOK_SECRET.txt").write_text(new_secret())
    with pytest.raises(SettingsError) as error:
        check_setting_names({}, tmp_path)
    assert str(error.value) == (
        f"unknown setting: file BRIDGE_WEBHOOK_SECRET.txt in {tmp_path}; "
        "did you mean BRIDGE_WEBHOOK_SECRET?"
    )


def test_serve_stops_with_exit_2_and_one_line_on_a_typod_variable() -> None:
    secret = new_secret()
    result = serve({"BRIDGE_WEBHOOK_SECRET": secret, "BRIDGE_DEDUP_WINDOWS": "60"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        "webhook-bridge: configuration error: unknown setting: environment variable "
        "BRIDGE_DEDUP_WINDOWS; did you mean BRIDGE_DEDUP_WINDOW?"
    )
    assert result.stdout == ""


def test_serve_stops_on_a_typod_secrets_file(tmp_path: Path) -> None:
    (tmp_path / "..data").mkdir()
    (tmp_path / "BRIDGE_WEBHOOK_SECRET").write_text(new_secret())
    (tmp_path / "BRIDGE_AMQP_ULR").write_text("amqp://guest:guest@127.0.0.1:5672/")
    result = serve({"BRIDGE_SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith(
        f"unknown setting: file BRIDGE_AMQP_ULR in {tmp_path}; did you mean BRIDGE_AMQP_URL?"
    )
    assert "guest" not in result.stderr


def test_only_serve_checks_names() -> None:
    """The test suite's own BRIDGE_TEST_AMQP_URL, or a typo, leaves other commands alone."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "trigger",
            "batch.completed",
            "--url",
            f"http://127.0.0.1:{free_port()}/webhooks/openai",
        ],
        env=os.environ
        | {"BRIDGE_WEBHOOK_SECRET": new_secret(), "BRIDGE_TEST_AMQP_URL": "amqp://x/"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "unknown setting" not in result.stderr
