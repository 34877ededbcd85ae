"""The dependency floors, the hashed pins CI and the image install, and the image's base.

pyproject.toml says which releases the bridge accepts; its floors keep out releases with a
known flaw the bridge can reach (FIXED below). constraints.txt and constraints-image.txt pin
one release of everything, with its hashes (:mod:`tests.pins`); CI installs the first, the
image the second. When pyproject's dependencies change, these tests fail until both files
are written again by the commands in their headers.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.pins import CONSTRAINTS, IMAGE_CONSTRAINTS, Pin, read_pins, regeneration_commands

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
IMAGE_EXTRAS = ("otel", "redis", "hydrate")

# Where each file's pins must hold: CI and development, and the image (bookworm's own python3
# in tests/test_image.py, the official python image in production).
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
CPYTHON = {"implementation_name": "cpython", "platform_python_implementation": "CPython"}
CI_ENVIRONMENT = {**LINUX, **CPYTHON, "python_version": "3.11", "python_full_version": "3.11.0"}
IMAGE_ENVIRONMENTS = [
    {**LINUX, **CPYTHON, "python_version": "3.11", "python_full_version": "3.11.2"},
    {**LINUX, **CPYTHON, "python_version": "3.12", "python_full_version": "3.12.8"},
]

# Releases with a flaw the bridge can reach, by the first release without it (pyproject.toml
# says, beside each floor, how the bridge reaches it).
FIXED = [
    ("aiohttp", "3.13.3", "CVE-2025-69223 (GHSA-6mq8-rvhq-8wgg): unbounded request bodies"),
    ("aiohttp", "3.14.1", "CVE-2026-54278 (GHSA-g3cq-j2xw-wf74): a body inflated whole on cleanup"),
    ("aiohttp", "3.14.4", "PYSEC-2026-4369, PYSEC-2026-4371: scheme from the request target"),
    ("aiohttp", "3.14.5", "GHSA-5wr8-gcqf-gqf3, GHSA-2g87-pp6c-29x5: no header timeout"),
    ("redis", "6.0.0", "rediss:// without a host name check (redis-py #3626)"),
    ("redis", "7.4.0", "the password in a client's repr (redis-py #3993, CWE-532)"),
    ("hiredis", "3.4.1", "a deeply nested reply overflows the C stack (hiredis 1.4.1)"),
    ("pydantic-settings", "2.14.2", "GHSA-4xgf-cpjx-pc3j: secrets read through symbolic links"),
    ("uvloop", "0.20.0", "CVE-2024-24806 (GHSA-f74f-cvh7-c6q6): libuv truncating host names"),
    ("urllib3", "2.6.0", "GHSA-gm62-xv2j-4w53, GHSA-2xpw-w6gg-jr37: unbounded decoding"),
    ("requests", "2.32.4", "CVE-2024-47081: .netrc credentials sent to a crafted host"),
]

STALE = "rewrite the pinned files from pyproject.toml, at the top of the tree:\n"


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """What pyproject.toml requires with these extras, and what builds its wheel."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    lines = [
        *PYPROJECT["project"]["dependencies"],
        *(line for extra in extras for line in optional[extra]),
        *PYPROJECT["build-system"]["requires"],
    ]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if canonicalize_name(r.name) != PROJECT]


def _unpinned(requirements: list[Requirement], pins: list[Pin], env: dict[str, str]) -> list[str]:
    """Each requirement that no pin applying in this environment satisfies."""
    unmet = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        versions = [pin.version for pin in pins if pin.name == name and pin.applies(env)]
        if len(versions) != 1 or not requirement.specifier.contains(versions[0], prereleases=True):
            unmet.append(f"{requirement} (pinned: {', '.join(map(str, versions)) or 'nothing'})")
    return unmet


def _floor(specifier: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in specifier if s.operator in (">=", ">", "==", "~=")]
    return max(bounds, default=None)


def test_ci_pins_satisfy_every_dependency_and_extra() -> None:
    everything = tuple(PYPROJECT["project"]["optional-dependencies"])
    unmet = _unpinned(_requirements(everything), read_pins(CONSTRAINTS), CI_ENVIRONMENT)
    assert unmet == [], f"{CONSTRAINTS.name} misses {unmet}; {STALE}{regeneration_commands()}"


@pytest.mark.parametrize("environment", IMAGE_ENVIRONMENTS, ids=lambda e: e["python_version"])
def test_image_pins_satisfy_the_dependencies_and_the_image_extras(
    environment: dict[str, str],
) -> None:
    pins = read_pins(IMAGE_CONSTRAINTS)
    unmet = _unpinned(_requirements(IMAGE_EXTRAS), pins, environment)
    assert unmet == [], f"{IMAGE_CONSTRAINTS.name} misses {unmet}; {STALE}{regeneration_commands()}"


def test_image_pins_are_the_ci_pins() -> None:
    ci = {pin.name: pin.version for pin in read_pins(CONSTRAINTS)}
    differing = [
        f"{pin.name}=={pin.version} (CI: {ci.get(pin.name, 'not pinned')})"
        for pin in read_pins(IMAGE_CONSTRAINTS)
        if pin.applies(CI_ENVIRONMENT) and ci.get(pin.name) != pin.version
    ]
    assert differing == [], f"the image would run {differing}; {STALE}{regeneration_commands()}"


@pytest.mark.parametrize("path", [CONSTRAINTS, IMAGE_CONSTRAINTS], ids=lambda path: path.name)
def test_every_pin_carries_sha256_hashes(path: Path) -> None:
    pins = read_pins(path)
    assert pins
    unhashed = [
        pin.name
        for pin in pins
        if not pin.hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes)
    ]
    assert unhashed == [], f"{path.name}: no sha256 hash for {unhashed}; {regeneration_commands()}"


@pytest.mark.parametrize(
    ("package", "fixed", "advisory"),
    [pytest.param(*row, id=f"{row[0]}-{row[1]}") for row in FIXED],
)
def test_floors_exclude_releases_with_known_flaws(package: str, fixed: str, advisory: str) -> None:
    everything = tuple(PYPROJECT["project"]["optional-dependencies"])
    requirements = [r for r in _requirements(everything) if canonicalize_name(r.name) == package]
    assert requirements, f"pyproject.toml no longer requires {package}: drop it from FIXED"
    for requirement in requirements:
        floor = _floor(requirement.specifier)
        assert floor is not None, f"{requirement} has no floor, so admits {advisory}"
        assert floor >= Version(fixed), f"{requirement} admits releases before {fixed}: {advisory}"


@pytest.mark.skipif(
    os.environ.get("BRIDGE_TEST_PINNED") != "1",
    reason="installed with pip install -e '.[test]', the newest releases allowed; "
    "bash .ci/run installs the pins and sets BRIDGE_TEST_PINNED=1",
)
def test_this_environment_runs_the_pinned_versions() -> None:
    """The suite runs on what constraints.txt pins: .ci/run installs nothing else."""
    here = {key: str(value) for key, value in default_environment().items()}
    mismatched = []
    for pin in read_pins(CONSTRAINTS):
        if not pin.applies(here):
            continue
        try:
            installed = importlib.metadata.version(pin.name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != str(pin.version):
            mismatched.append(f"{pin.name} {installed} (pinned {pin.version})")
    assert mismatched == [], (
        f"this environment differs from {CONSTRAINTS.name}: {mismatched}; install the pins with "
        f"`pip install --require-hashes --no-deps -r {CONSTRAINTS.name}`, as .ci/run does"
    )


def test_image_base_is_pinned_by_digest_wherever_it_is_named() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert match, "the Dockerfile must take its base as ARG PYTHON_IMAGE with a default"
    base = match.group(1)
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), (
        f"the image's base {base} must be pinned as tag@sha256:<digest of the tag's index>"
    )
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    argument = compose["services"]["bridge"]["build"]["args"]["PYTHON_IMAGE"]
    default = re.fullmatch(r"\$\{PYTHON_IMAGE:-(.+)\}", argument)
    assert default, f"docker-compose.yml passes PYTHON_IMAGE={argument} with no default"
    assert default.group(1) == base, (
        f"docker-compose.yml builds from {default.group(1)}, not the Dockerfile's {base}"
    )
