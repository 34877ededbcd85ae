"""``python -m docsgen [--check]``."""

from __future__ import annotations

import argparse
import sys

from docsgen.pages import FIX_COMMAND, ROOT, generate, stale, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m docsgen", description="Write the reference pages generated from the code."
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a page is out of date"
    )
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        outdated = stale(files)
        for path in outdated:
            print(f"{path.relative_to(ROOT)} is out of date", file=sys.stderr)
        if outdated:
            print(f"regenerate with: {FIX_COMMAND}", file=sys.stderr)
        return 1 if outdated else 0
    for path in write(files):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
