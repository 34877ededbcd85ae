"""Without the ``otel``, ``redis`` and ``hydrate`` extras' packages, in this virtualenv.

Each check runs in a fresh interpreter where ``opentelemetry``, ``redis`` and ``openai`` cannot be
imported (``sys.modules[name] = None``, which is how Python reports a missing top-level
package to ``import`` and to ``importlib.util.find_spec``). tests/test_install_profiles.py
checks the same on real installs of the wheel; these run in a second.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.consumer import _consumer_spans
from tests.conftest import free_port, new_secret
from tests.install_profiles import EXTRA_MODULES, IMPORT_EVERY_MODULE

WITHOUT_THE_EXTRAS = """
import sys
for package in ("opentelemetry", "redis", "openai"):
    sys.modules[package] = None
"""


def without_the_extras(
    program: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRAS + program],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_module_imports_or_names_its_extra(tmp_path: Path) -> None:
    done = without_the_extras(IMPORT_EVERY_MODULE, tmp_path)
    assert done.returncode == 0, done.stderr
    outcomes: dict[str, str] = json.loads(done.stdout)["outcomes"]
    assert outcomes == {
        module: f"needs {EXTRA_MODULES[module]}" if module in EXTRA_MODULES else "imported"
        for module in outcomes
    }


def test_consumer_spans_need_only_the_opentelemetry_api(tmp_path: Path) -> None:
    assert _consumer_spans("billing") is not None
    done = without_the_extras(
        'from bridge.consumer import _consumer_spans; print(_consumer_spans("billing"))', tmp_path
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")


def test_spans_asked_for_without_the_sdk_name_the_extra(tmp_path: Path) -> None:
    done = without_the_extras(
        """
from bridge.tracing import PropagationOnly, TracingConfigurationError, from_environment
assert isinstance(from_environment({}), PropagationOnly)
try:
    from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
except TracingConfigurationError as error:
    print(error)
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "OTEL_TRACES_EXPORTER or an OTLP endpoint is set, but the OpenTelemetry SDK is not "
        "installed: pip install 'openai-webhook-bridge[otel]', or unset them\n"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_with_one_line_naming_the_extra(tmp_path: Path, workers: str) -> None:
    environ = {
        "BRIDGE_WORKERS": workers,
        "BRIDGE_METRICS_PORT": "0",
        "PATH": "/usr/bin:/bin",
        "BRIDGE_WEBHOOK_SECRET": new_secret(),
        "BRIDGE_SECRETS_DIR": str(tmp_path),
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": str(free_port()),
        "OTEL_TRACES_EXPORTER": "otlp",
    }
    done = without_the_extras(
        "from bridge.cli import main; sys.exit(main(['serve']))", tmp_path, environ
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("webhook-bridge: configuration error: OTEL_TRACES_EXPORTER")
    assert done.stderr.count("\n") == 1


def test_the_redis_idempotency_store_names_its_extra_when_constructed(tmp_path: Path) -> None:
    done = without_the_extras(
        """
from bridge.dedup.idempotency import RedisIdempotencyStore
try:
    RedisIdempotencyStore("redis://127.0.0.1:6379/0", namespace="billing")
except ImportError as error:
    print(type(error).__name__, error)
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "MissingExtraError RedisIdempotencyStore needs the 'redis' extra: "
        "pip install 'openai-webhook-bridge[redis]'\n"
    )


def test_hydrate_stops_with_one_line_naming_its_extra(tmp_path: Path) -> None:
    done = without_the_extras(
        "import sys; from bridge.cli import main; sys.exit(main(['hydrate']))",
        tmp_path,
        env={
            "PATH": os.environ["PATH"],
            "OPENAI_API_KEY": "sk-test-" + secrets.token_hex(8),
            "BRIDGE_HYDRATE_METRICS_PORT": "0",
        },
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "webhook-bridge: webhook-bridge hydrate needs the 'hydrate' extra: "
        "pip install 'openai-webhook-bridge[hydrate]'\n"
    )


def test_objects_are_plain_json_without_the_sdk(tmp_path: Path) -> None:
    done = without_the_extras(
        "from bridge.consumer.objects import as_sdk_object\n"
        "print(as_sdk_object({'object': 'batch', 'id': 'batch_1'}))",
        tmp_path,
    )
    assert (done.returncode, done.stdout) == (0, "{'object': 'batch', 'id': 'batch_1'}\n")
