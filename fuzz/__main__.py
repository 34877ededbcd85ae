"""``python -m fuzz HARNESS [--work-dir DIR] [libFuzzer flags]``: run one harness.

The fuzzer grows its corpus in ``DIR/corpus`` (default ``build/fuzz/HARNESS``,
git-ignored), reads the seeds in ``fuzz/corpus/HARNESS`` without writing there, and
saves a crashing input as ``DIR/crash-<sha1>``. Every other argument goes to
libFuzzer: ``-max_total_time=SECONDS``, ``-runs=N``, ``-jobs``, or a crash file's
path to replay it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import atheris

HARNESSES = ("signature", "classification", "frames", "publish_path")
ROOT = Path(__file__).resolve().parent.parent
SEEDS = Path(__file__).resolve().parent / "corpus"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description="Fuzz one harness over the code that reads untrusted input.",
        epilog="Unrecognised arguments are passed to libFuzzer (e.g. -max_total_time=60).",
    )
    parser.add_argument("harness", choices=HARNESSES)
    parser.add_argument("--work-dir", type=Path, help="default: build/fuzz/HARNESS")
    args, libfuzzer_arguments = parser.parse_known_args(argv)
    work_dir: Path = args.work_dir or ROOT / "build" / "fuzz" / args.harness
    corpus = work_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)

    with atheris.instrument_imports(include=["bridge", "fuzz"]):
        harness = importlib.import_module(f"fuzz.{args.harness}")
    replaying = any(not argument.startswith("-") for argument in libfuzzer_arguments)
    directories = [] if replaying else [str(corpus), str(SEEDS / args.harness)]
    atheris.Setup(
        [sys.argv[0], f"-artifact_prefix={work_dir}/", *libfuzzer_arguments, *directories],
        harness.check,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
