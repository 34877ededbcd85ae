"""Where a mode's results go: ``<kind>-<run id>.md`` and ``.json``, and ``<kind>-latest``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(
    results_dir: Path, kind: str, run_id: str, markdown: str, document: dict[str, Any]
) -> Path:
    """Write both forms under the run's name and as the latest; the run's markdown path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"{kind}-{run_id}", f"{kind}-latest"):
        (results_dir / f"{name}.md").write_text(markdown)
        (results_dir / f"{name}.json").write_text(json.dumps(document, indent=2))
    return results_dir / f"{kind}-{run_id}.md"
