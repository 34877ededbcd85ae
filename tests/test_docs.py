"""The documentation site: generated reference pages are fresh and complete, and the strict
build passes (and fails on a broken link or anchor)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import build_parser
from bridge.events import KNOWN_EVENT_TYPES
from bridge.metrics import MULTIPROCESS_DIR_VARIABLE, Metrics
from docsgen.cli_page import commands
from docsgen.settings_page import undescribed_settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
PACKAGE = ROOT / "bridge"

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)


def _reference(page: str) -> str:
    return (REFERENCE / page).read_text(encoding="utf-8")


def test_generated_pages_are_fresh() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "docsgen", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def _names_read_by_package() -> set[str]:
    """Every ``BRIDGE_*`` name spelled out in the package, built by ``env_name("...")``,
    or written as ``{ENV_PREFIX}NAME``."""
    names: set[str] = set()
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        names |= set(re.findall(r"\bBRIDGE_[A-Z0-9_]*[A-Z0-9]", text))
        names |= {
            f"BRIDGE_{field.upper()}"
            for field in re.findall(r"env_name\(\s*['\"]([a-z0-9_]+)['\"]\s*\)", text)
        }
        names |= {f"BRIDGE_{name}" for name in re.findall(r"\{ENV_PREFIX\}([A-Z0-9_]+)", text)}
    return names


def test_every_setting_the_package_reads_is_on_the_settings_page() -> None:
    names = _names_read_by_package()
    assert "BRIDGE_SECRETS_DIR" in names, "the search no longer finds what the package reads"
    page = _reference("settings.md")
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, f"not on docs/reference/settings.md: {missing}"


def test_every_setting_says_what_it_means() -> None:
    assert not undescribed_settings(), (
        "settings without a description (Field(description=...) in bridge/settings.py): "
        f"{undescribed_settings()}"
    )


def test_every_command_is_on_the_cli_page() -> None:
    page = _reference("cli.md")
    found = commands(build_parser())
    assert len(found) > 5
    missing = [command.name for command in found if f"`{command.name}`" not in page]
    assert not missing, f"not on docs/reference/cli.md: {missing}"
    flags = {
        flag
        for command in found
        for action in command.parser._actions
        for flag in action.option_strings
    }
    assert not [flag for flag in flags if flag not in page]


def test_every_metric_is_on_the_metrics_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_VARIABLE, raising=False)
    families = list(Metrics(secret_count=1).registry.collect())
    assert len(families) > 5
    page = _reference("metrics.md")
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}
    missing = [
        family.name for family in families if f"`{family.name}{suffix[family.type]}`" not in page
    ]
    assert not missing, f"not on docs/reference/metrics.md: {missing}"


def test_every_event_type_is_on_the_events_page() -> None:
    page = _reference("events.md")
    assert len(KNOWN_EVENT_TYPES) == 31
    missing = sorted(name for name in KNOWN_EVENT_TYPES if f"### `{name}`" not in page)
    assert not missing, f"not on docs/reference/events.md: {missing}"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", config, "-d", site],
        capture_output=True,
        text=True,
        check=False,
        # Material's notice of its end of life is printed on every build otherwise.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )


@needs_mkdocs
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    built = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "reference" / "asyncapi.json").is_file()


@needs_mkdocs
@pytest.mark.parametrize(
    ("link", "complaint"),
    [
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](settings.md#no-such-anchor)", "no-such-anchor"),
    ],
)
def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path, link: str, complaint: str) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "reference" / "cli.md"
    page.write_text(page.read_text(encoding="utf-8") + f"\n{link}\n", encoding="utf-8")
    built = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert complaint in built.stderr
