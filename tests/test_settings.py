"""Configuration is read once, fails closed, and never echoes a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.settings import SettingsError, load_settings
from tests.conftest import new_secret


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path / "no-such-dir"))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    settings = load_settings()
    assert settings.exchange == "openai.webhooks"
    assert settings.quarantine_exchange == "openai.webhooks.quarantine"
    assert settings.unrouted_exchange == "openai.webhooks.unrouted"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.timestamp_tolerance == 300
    assert settings.max_body_bytes == 256 * 1024
    assert settings.publish_timeout == 5.0
    assert settings.drain_timeout < 30
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"


def test_several_secrets_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", f"{new_secret()}, {new_secret()}")
    assert len(load_settings().signing_keys) == 2


def test_derived_exchange_names_follow_the_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("BRIDGE_EXCHANGE", "acme.openai")
    settings = load_settings()
    assert settings.unrouted_exchange == "acme.openai.unrouted"
    assert settings.quarantine_exchange == "acme.openai.quarantine"


def test_secret_files_are_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = new_secret()
    (tmp_path / "BRIDGE_WEBHOOK_SECRET").write_text(secret + "\n")
    (tmp_path / "BRIDGE_AMQP_URL").write_text("amqp://bridge:file-password@rabbit:5672/\n")
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.webhook_secret.get_secret_value() == secret
    assert settings.amqp_url_redacted == "amqp://bridge:***@rabbit:5672/"
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://other@rabbit2/")
    assert load_settings().amqp_url_redacted == "amqp://other@rabbit2/"


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("BRIDGE_PORT", "9000")
    assert load_settings(port="9100").port == 9100


def test_errors_name_every_bad_setting_and_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", "whsec_c2hvcnQ=")
    monkeypatch.setenv("BRIDGE_AMQP_URL", "http://user:hunter2-password@host/")
    monkeypatch.setenv("BRIDGE_PUBLISH_TIMEOUT", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message
    for name in ("BRIDGE_WEBHOOK_SECRET", "BRIDGE_AMQP_URL", "BRIDGE_PUBLISH_TIMEOUT"):
        assert name in message
    assert "hunter2" not in message
    assert "c2hvcnQ" not in message


def test_amqps_gets_a_tls_context_with_the_configured_ca(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqps://bridge:pw@rabbit:5671/")
    assert load_settings().amqp_ssl_context() is not None
    monkeypatch.setenv("BRIDGE_AMQP_CA_FILE", str(tmp_path / "missing-ca.pem"))
    with pytest.raises(FileNotFoundError):
        load_settings().amqp_ssl_context()
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://bridge:pw@rabbit/")
    assert load_settings().amqp_ssl_context() is None


def test_a_cluster_is_a_comma_separated_list_of_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv(
        "BRIDGE_AMQP_URL",
        "amqp://bridge:pw-one@rabbit-0:5672/, amqps://bridge:pw-two@rabbit-1/,amqp://rabbit-2/",
    )
    settings = load_settings()
    assert [url.host for url in settings.amqp_urls] == ["rabbit-0", "rabbit-1", "rabbit-2"]
    assert settings.amqp_url_redacted == (
        "amqp://bridge:***@rabbit-0:5672/,amqps://bridge:***@rabbit-1/,amqp://rabbit-2/"
    )
    assert settings.amqp_ssl_context(settings.amqp_urls[0]) is None
    assert settings.amqp_ssl_context(settings.amqp_urls[1]) is not None
    assert (settings.amqp_heartbeat, settings.queue_type) == (10, "quorum")


def test_every_url_of_the_list_is_checked_and_none_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://a:pw@rabbit-0/,http://b:hunter2@rabbit-1/")
    monkeypatch.setenv("BRIDGE_QUEUE_TYPE", "stream")
    monkeypatch.setenv("BRIDGE_AMQP_HEARTBEAT", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert "BRIDGE_AMQP_URL URL #2 must be an amqp://" in message
    assert "BRIDGE_QUEUE_TYPE" in message
    assert "BRIDGE_AMQP_HEARTBEAT" in message
    assert "hunter2" not in message
    assert "pw" not in message


def test_a_password_given_as_a_query_argument_is_redacted_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("BRIDGE_DEDUP_URL", "redis://redis:6379/0?password=s3cret-pw&db=1")
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://bridge:amqp-pw@rabbit/?heartbeat=5")
    settings = load_settings()
    assert "s3cret-pw" not in settings.dedup_url_redacted
    assert "password=***" in settings.dedup_url_redacted
    assert settings.amqp_url_redacted == "amqp://bridge:***@rabbit/?heartbeat=5"
