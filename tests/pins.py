"""The hashed pins that CI and the image install, read from the files uv writes.

``constraints.txt`` pins every dependency and extra (tests, docs, the tools that build the
wheel, pip itself) for CPython 3.11 on Linux x86_64, where CI and development run;
``constraints-image.txt`` pins what the image installs (no extras but ``otel`` and ``redis``)
for any CPython from 3.11, at the same versions. pip installs either with ``--require-hashes
--no-deps -r``, so each file it downloads must match a listed hash. The second line of each
file is the command that wrote it; both are rerun, in order, when pyproject.toml changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
IMAGE_CONSTRAINTS = ROOT / "constraints-image.txt"


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, environment: dict[str, str]) -> bool:
        return self.marker is None or self.marker.evaluate(environment)


def read_pins(path: Path) -> list[Pin]:
    pins = []
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        words = line.partition("#")[0].split()
        if not words:
            continue
        hashes = tuple(word for word in words if word.startswith("--hash="))
        requirement = Requirement(" ".join(word for word in words if word not in hashes))
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {line.strip()} is not an exact pin"
        pins.append(
            Pin(
                canonicalize_name(requirement.name),
                Version(specifier.version),
                requirement.marker,
                tuple(word.removeprefix("--hash=") for word in hashes),
            )
        )
    return pins


def regeneration_commands() -> str:
    """What to run at the top of the tree to rewrite both files from pyproject.toml."""
    files = (CONSTRAINTS, IMAGE_CONSTRAINTS)
    commands = [path.read_text().splitlines()[1].lstrip("# ") for path in files]
    return "\n".join(["pip install uv", *commands])
