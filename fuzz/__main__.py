"""``python -m fuzz HARNESS [--work-dir DIR] [libFuzzer flags]``: run one harness.

The fuzzer grows its corpus in ``DIR/corpus`` (default ``build/fuzz/HARNESS``,
git-ignored), reads the seeds in ``fuzz/corpus/HARNESS`` without writing there, and
saves a crashing input as ``DIR/crash-<sha1>``. ``fuzz/dictionaries/HARNESS.dict``,
where there is one, gives libFuzzer the tokens of the input's format (header names,
JSON syntax, event types): the bridge's parsing is mostly native code (pydantic-core,
``re``), which atheris cannot trace, so without them the fuzzer is left guessing
what that code reads. Every other argument goes to
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
DICTIONARIES = Path(__file__).resolve().parent / "dictionaries"


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
    dictionary = DICTIONARIES / f"{args.harness}.dict"
    defaults = [f"-artifact_prefix={work_dir}/"]
    if dictionary.exists() and not any(a.startswith("-dict=") for a in libfuzzer_arguments):
        defaults.append(f"-dict={dictionary}")
    atheris.Setup([sys.argv[0], *defaults, *libfuzzer_arguments, *directories], harness.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
