"""Building and running the bridge's container image without a container engine daemon.

The base image stands in for the official ``python:*-slim-bookworm`` one (which needs a
registry): Debian bookworm bootstrapped with ``debootstrap`` from the mirror this
machine's apt uses, with Python, ``venv`` and the machine's CA bundle (so that pip inside
the build trusts the same TLS roots as the host, including a proxy's own CA). It is built
once per recipe and kept under ``/var/cache``; ``python -m tests.image`` builds it ahead
of a test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE_DIR = Path(os.environ.get("BRIDGE_IMAGE_CACHE", "/var/cache/openai-webhook-bridge"))
BASE_REPOSITORY = "localhost/webhook-bridge-test-base"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
FALLBACK_MIRROR = "http://deb.debian.org/debian"
# pip inside the build reads this: it trusts the bundle above rather than its own copy.
PIP_CONFIG = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"

BOOTSTRAP_TIMEOUT = 900
BUILD_TIMEOUT = 900


def tools_missing() -> list[str]:
    return [tool for tool in ("debootstrap", "podman", "buildah") if shutil.which(tool) is None]


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for the main suite."""
    texts = []
    for source in APT_SOURCES:
        files = sorted(source.glob("*")) if source.is_dir() else [source]
        texts += [path.read_text() for path in files if path.is_file()]
    for text in texts:
        # deb822 stanzas ("URIs:" beside "Suites: bookworm ...") and one-line "deb URI suite".
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:(.*)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                uri = next(word for word in words[1:] if not word.startswith("["))
                return uri
    return FALLBACK_MIRROR


@dataclass(frozen=True)
class BaseRecipe:
    mirror: str
    ca_bundle: bytes

    @classmethod
    def for_this_machine(cls) -> BaseRecipe:
        return cls(debian_mirror(), HOST_CA_BUNDLE.read_bytes())

    @property
    def key(self) -> str:
        recipe = {
            "suite": SUITE,
            "mirror": self.mirror,
            "packages": PACKAGES,
            "pip": PIP_CONFIG,
            "ca": hashlib.sha256(self.ca_bundle).hexdigest(),
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image(self) -> str:
        return f"{BASE_REPOSITORY}:{self.key}"

    @property
    def tarball(self) -> Path:
        return CACHE_DIR / f"base-{SUITE}-{self.key}.tar"


def _run(*command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command[:3])} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


def image_exists(reference: str) -> bool:
    result = subprocess.run(
        ["podman", "image", "exists", reference], capture_output=True, timeout=60, check=False
    )
    return result.returncode == 0


def ensure_base(recipe: BaseRecipe) -> str:
    """The base image's reference, bootstrapping and importing it only when not cached."""
    if image_exists(recipe.image):
        return recipe.image
    if not recipe.tarball.is_file():
        _bootstrap(recipe)
    _run("podman", "import", str(recipe.tarball), recipe.image, timeout=BOOTSTRAP_TIMEOUT)
    return recipe.image


def _bootstrap(recipe: BaseRecipe) -> None:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-") as work:
        root = Path(work) / "root"
        _run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            recipe.mirror,
            timeout=BOOTSTRAP_TIMEOUT,
        )
        (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(recipe.ca_bundle)
        (root / "etc/pip.conf").write_text(PIP_CONFIG)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = recipe.tarball.with_suffix(".partial")
        _run("tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), ".", timeout=600)
        partial.rename(recipe.tarball)


if __name__ == "__main__":
    print(ensure_base(BaseRecipe.for_this_machine()))
