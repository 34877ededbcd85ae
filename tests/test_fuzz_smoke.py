"""The atheris harnesses in fuzz/: each runs clean for a few seconds, and each can fail.

The smoke run is the ``fuzz`` marker (``-m "not fuzz"`` skips it); the campaign's
figures are in the README's Performance section.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("atheris")

from bridge.events import Classified
from bridge.frames import MessageProperties, encode_publish
from fuzz import classification, frames, publish_path, signature
from fuzz.__main__ import HARNESSES, SEEDS

ROOT = Path(__file__).resolve().parent.parent
SECONDS_PER_HARNESS = 7
CHECKS: dict[str, Callable[[bytes], None]] = {
    "signature": signature.check,
    "classification": classification.check,
    "frames": frames.check,
    "publish_path": publish_path.check,
}


def seeds(harness: str) -> list[Path]:
    return sorted((SEEDS / harness).iterdir())


def test_every_harness_has_a_check_and_a_small_seed_corpus() -> None:
    assert set(CHECKS) == set(HARNESSES)
    for harness in HARNESSES:
        assert 1 <= len(seeds(harness)) <= 15
        assert all(path.stat().st_size <= 4096 for path in seeds(harness))


@pytest.mark.parametrize("harness", HARNESSES)
def test_every_seed_holds_the_properties(harness: str) -> None:
    for path in seeds(harness):
        CHECKS[harness](path.read_bytes())


@pytest.mark.fuzz
@pytest.mark.timeout(60)
@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_without_a_crash(harness: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "fuzz", harness, "--work-dir", str(tmp_path)),
            *(f"-max_total_time={SECONDS_PER_HARNESS}", "-print_final_stats=1"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(tmp_path.glob("crash-*")) == []
    done = re.search(r"^Done (\d+) runs in", run.stderr, re.MULTILINE)
    assert done, run.stderr[-3000:]
    assert int(done.group(1)) > 1000
    assert any((tmp_path / "corpus").iterdir()), "the fuzzer kept no input"


# Each harness must notice the bug it exists to find.


class AcceptsAnything:
    def verify(self, headers: object, body: bytes) -> int:
        return signature.GENUINE_INDEX


def test_signature_harness_catches_an_accepted_forgery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signature, "VERIFIER", AcceptsAnything())
    with pytest.raises(AssertionError, match="without the genuine signature"):
        signature.check((SEEDS / "signature" / "mismatch").read_bytes())


def test_classification_harness_catches_a_wrong_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    def calls_everything_unknown(body: bytes) -> Classified:
        return Classified(kind="unknown", event_type="batch.completed", created_at=1, reason=None)

    monkeypatch.setattr(classification, "classify", calls_everything_unknown)
    with pytest.raises(AssertionError):
        classification.check((SEEDS / "classification" / "not-an-object").read_bytes())


def test_frames_harness_catches_a_lost_header(monkeypatch: pytest.MonkeyPatch) -> None:
    def drops_headers(*, properties: MessageProperties, **arguments: object) -> bytes:
        without = MessageProperties(message_id=properties.message_id, app_id=properties.app_id)
        return encode_publish(properties=without, **arguments)  # type: ignore[arg-type]

    monkeypatch.setattr(frames, "encode_publish", drops_headers)
    found = 0
    for length in range(40, 400):
        try:
            frames.check(bytes(range(256))[:length] * 3)
        except AssertionError:
            found += 1
    assert found
