"""The package as users install it: the wheel a release builds, in virtualenvs of its own.

Once per pytest session the tree is copied as a clean checkout would hold it (tracked
and untracked files, nothing git-ignored) and built the way a release is, with
``python -m build``: the sdist, then the wheel from the sdist. Each profile is a
virtualenv without extras (``plain``), with ``[redis]`` or with ``[otel]``.

Resolving and downloading a profile's dependencies is the slow part, so they are
installed once into a virtualenv cached under ``build/install-profiles/`` (git-ignored),
named by a digest of what it installs: the Python version and the wheel's requirements
for that extra. A cached virtualenv counts only once its ``complete`` file names that
digest (written last, under a lock), so one left half-built by an interrupted run is
built again, and so is one that stopped working (``pip check`` or the import of the
package fails). Each session then makes a fresh virtualenv per profile that sees those
dependencies through a ``.pth`` file and installs the session's wheel itself, without
dependencies: the cached one is never modified, and sessions running side by side do
not replace each other's package.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

__all__ = [
    "EXTRA_MODULES",
    "IMPORT_EVERY_MODULE",
    "PROFILE_EXTRAS",
    "REPOSITORY",
    "InstalledProfile",
    "Release",
    "otel_install",
    "plain_install",
    "profile",
    "redis_install",
    "release",
]

REPOSITORY = Path(__file__).resolve().parent.parent
CACHE = REPOSITORY / "build" / "install-profiles"
DISTRIBUTION = "openai-webhook-bridge"
# Each profile's extras, by name.
PROFILE_EXTRAS: dict[str, tuple[str, ...]] = {"plain": (), "redis": ("redis",), "otel": ("otel",)}
# The modules that exist only for an extra: importing one without it raises
# bridge.extras.MissingExtraError naming the extra. Every other module imports anywhere.
EXTRA_MODULES = {
    "bridge.dedup.redis_claims": "redis",
    "bridge.dedup.redis_pipeline": "redis",
    "bridge.dedup.redis_store": "redis",
    "bridge.hydrate.api": "hydrate",
    "bridge.tracing.api": "otel",
    "bridge.tracing.otel": "otel",
}
# Imports every module of the package (``python -c``) and prints, as JSON, where the
# package was imported from and each module's outcome: "imported", "needs EXTRA" or
# "failed: ERROR". bridge.__main__ is left out: importing it runs the command.
IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil
import bridge
from bridge.extras import MissingExtraError

outcomes = {}
for module in pkgutil.walk_packages(bridge.__path__, "bridge."):
    if module.name == "bridge.__main__":
        continue
    try:
        importlib.import_module(module.name)
    except MissingExtraError as missing:
        outcomes[module.name] = f"needs {missing.extra}"
    except Exception as error:
        outcomes[module.name] = f"failed: {error!r}"
    else:
        outcomes[module.name] = "imported"
print(json.dumps({"file": bridge.__file__, "outcomes": outcomes}))
"""
# Inherited settings would configure the installed commands behind the tests' backs.
_NOT_INHERITED_PREFIXES = ("BRIDGE_", "OTEL_")
_NOT_INHERITED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")


@dataclass(frozen=True)
class Release:
    """What ``python -m build`` made of the tree, and the tree it made it from."""

    source: Path
    sdist: Path
    wheel: Path

    def wheel_files(self) -> set[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return set(archive.namelist())

    def requirements(self, extras: tuple[str, ...]) -> list[Requirement]:
        """The wheel's requirements that apply here with ``extras``."""
        with zipfile.ZipFile(self.wheel) as archive:
            metadata_path = next(
                name for name in archive.namelist() if name.endswith(".dist-info/METADATA")
            )
            metadata = HeaderParser().parsestr(archive.read(metadata_path).decode())
        requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
        return [
            requirement
            for requirement in requirements
            if requirement.marker is None
            or any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))
        ]


@dataclass(frozen=True)
class InstalledProfile:
    """The wheel installed in a virtualenv with the extras of profile ``name``."""

    name: str
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def command(self, name: str) -> Path:
        """A console script this profile installed."""
        path = self.bin / name
        if not path.is_file():
            raise FileNotFoundError(f"the {self.name} install has no command {name!r}")
        return path

    def environ(self, **extra: str) -> dict[str, str]:
        """This process's environment with the profile's bin first on PATH, none of its
        BRIDGE_* or OTEL_* settings, and ``extra``."""
        environ = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(_NOT_INHERITED_PREFIXES) and name not in _NOT_INHERITED
        }
        environ["PATH"] = os.pathsep.join(filter(None, [str(self.bin), environ.get("PATH")]))
        environ["VIRTUAL_ENV"] = str(self.venv)
        environ.update(extra)
        return environ


@functools.cache
def _session() -> Path:
    """This session's builds and virtualenvs, removed when the interpreter exits."""
    path = Path(tempfile.mkdtemp(prefix="install-profiles-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _run(*command: str | Path, cwd: Path | None = None) -> None:
    """Run a build or install step; its output is shown only when it fails."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stdout}")


def _pip(python: Path, *arguments: str | Path) -> None:
    """This virtualenv's pip, installing into the virtualenv of ``python``."""
    _run(sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", *arguments)


def checkout_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPOSITORY / name).is_file()]


@functools.cache
def release() -> Release:
    """The sdist and the wheel built from it, once per session."""
    root = _session()
    source = root / "source"
    for name in checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, source / name)
    dist = root / "dist"
    # Without --sdist or --wheel, build makes the sdist and then the wheel from it.
    _run(sys.executable, "-m", "build", "--outdir", dist, source)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return Release(source, sdist, wheel)


def _site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


def _new_venv(path: Path) -> Path:
    # Without pip: every install is done by this process's pip (``pip --python``).
    _run(sys.executable, "-m", "venv", "--without-pip", path)
    return path / "bin" / "python"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Held while a cached virtualenv is checked or built: sessions may start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _dependencies(name: str, built: Release, *, rebuild: bool = False) -> Path:
    """The site-packages of the cached virtualenv holding profile ``name``'s dependencies;
    ``rebuild`` discards a cached one that turned out not to work."""
    extras = PROFILE_EXTRAS[name]
    specification = {
        "python": sys.version,
        "platform": sysconfig.get_platform(),
        "requirements": sorted(str(requirement) for requirement in built.requirements(extras)),
    }
    digest = hashlib.sha256(json.dumps(specification, sort_keys=True).encode()).hexdigest()[:16]
    venv = CACHE / f"{name}-{digest}"
    complete = venv / "complete"
    with _locked(CACHE / f"{name}.lock"):
        if not rebuild and complete.is_file() and complete.read_text() == digest:
            return _site_packages(venv)
        # Older specifications of this profile, and this one if an earlier run stopped
        # half-way, are built again from nothing.
        for stale in CACHE.glob(f"{name}-*"):
            shutil.rmtree(stale)
        python = _new_venv(venv)
        wanted = f"{built.wheel}[{','.join(extras)}]" if extras else str(built.wheel)
        _pip(python, "install", "--quiet", wanted)
        _pip(python, "uninstall", "--yes", "--quiet", DISTRIBUTION)
        complete.write_text(digest)
    return _site_packages(venv)


@functools.cache
def profile(name: str) -> InstalledProfile:
    """Profile ``name`` (``plain``, ``redis`` or ``otel``) with this session's wheel."""
    if name not in PROFILE_EXTRAS:
        raise ValueError(f"no install profile {name!r}; there are {sorted(PROFILE_EXTRAS)}")
    built = release()
    venv = _session() / "venvs" / name
    python = _new_venv(venv)
    _pip(python, "install", "--quiet", "--no-deps", "--no-index", built.wheel)
    installed = InstalledProfile(name, venv)
    if _problem(installed, _dependencies(name, built)) is not None:
        problem = _problem(installed, _dependencies(name, built, rebuild=True))
        if problem is not None:
            raise RuntimeError(f"the {name} install does not work, even built afresh: {problem}")
    return installed


def _problem(installed: InstalledProfile, dependencies: Path) -> str | None:
    """Point ``installed`` at ``dependencies``; what fails then, if anything: a missing
    requirement (``pip check``), or the package not importing from the virtualenv."""
    (_site_packages(installed.venv) / "install-profile-dependencies.pth").write_text(
        f"import site; site.addsitedir({str(dependencies)!r})\n"
    )
    # Outside the repository, so that nothing can import the package from the checkout.
    where = subprocess.run(
        [installed.python, "-c", "import bridge.cli; print(bridge.__file__)"],
        cwd=_session(),
        env=installed.environ(),
        capture_output=True,
        text=True,
        check=False,
    )
    if not Path(where.stdout.strip()).is_relative_to(installed.venv):
        return f"bridge is imported from {where.stdout.strip()!r}: {where.stderr}"
    checked = subprocess.run(
        [sys.executable, "-m", "pip", "--python", installed.python, "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if checked.returncode == 0 else checked.stdout + checked.stderr


@pytest.fixture(scope="session")
def plain_install() -> InstalledProfile:
    return profile("plain")


@pytest.fixture(scope="session")
def redis_install() -> InstalledProfile:
    return profile("redis")


@pytest.fixture(scope="session")
def otel_install() -> InstalledProfile:
    return profile("otel")
