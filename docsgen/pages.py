"""The generated files under docs/reference/, and how to write or check them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from docsgen import asyncapi_page, cli_page, events_page, messages_page, metrics_page, settings_page

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
FIX_COMMAND = "python -m docsgen"

GENERATORS: dict[str, Callable[[], str]] = {
    "settings.md": settings_page.render,
    "cli.md": cli_page.render,
    "metrics.md": metrics_page.render,
    "events.md": events_page.render,
    "messages.md": messages_page.render,
    "asyncapi.md": asyncapi_page.render_page,
    asyncapi_page.DOCUMENT_FILE: asyncapi_page.render_document,
}
# The pages describe the defaults, never the settings of the shell that runs the generator.
_IGNORED_ENVIRONMENT = ("BRIDGE_", "OTEL_", "PROMETHEUS_MULTIPROC_DIR")


@contextmanager
def _default_environment() -> Iterator[None]:
    saved = {
        name: value for name, value in os.environ.items() if name.startswith(_IGNORED_ENVIRONMENT)
    }
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


def generate() -> dict[Path, str]:
    """Every generated file's path and content."""
    with _default_environment():
        return {REFERENCE / name: render() for name, render in GENERATORS.items()}


def stale(files: dict[Path, str]) -> list[Path]:
    """The files whose committed content differs from ``files``."""
    return [path for path, text in files.items() if _read(path) != text]


def write(files: dict[Path, str]) -> list[Path]:
    """Write the files that differ; return them."""
    changed = stale(files)
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path], encoding="utf-8")
    return changed


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
