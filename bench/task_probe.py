"""``python -m bench.task_probe --probe-file PATH``: ``webhook-bridge serve``, counting tasks.

The soak's launcher for the bridge: it runs the ``serve`` command unchanged (settings
from the environment, as ``python -m bridge serve``) on an event loop that also runs
one probe task, which writes ``{"tasks": N}`` to PATH four times a second: the number of
the loop's unfinished asyncio tasks, the probe itself not counted. The bridge has
no debug endpoint, and needs none for this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import uvloop

from bridge.cli import main as bridge_main

PROBE_INTERVAL_S = 0.25
Loop = TypeVar("Loop", bound=asyncio.AbstractEventLoop)


async def write_task_counts(path: Path) -> None:
    scratch = path.with_name(path.name + ".tmp")
    while True:
        count = len(asyncio.all_tasks()) - 1
        scratch.write_text(json.dumps({"tasks": count}))
        os.replace(scratch, path)
        await asyncio.sleep(PROBE_INTERVAL_S)


def probed(new_event_loop: Callable[[], Loop], path: Path) -> Callable[[], Loop]:
    """A loop factory like ``new_event_loop`` whose loops start the probe task."""
    probes: list[asyncio.Task[None]] = []  # referenced here: loops hold tasks weakly

    def new_probed_loop() -> Loop:
        loop = new_event_loop()
        loop.call_soon(lambda: probes.append(loop.create_task(write_task_counts(path))))
        return loop

    return new_probed_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.task_probe")
    parser.add_argument("--probe-file", type=Path, required=True)
    args = parser.parse_args(argv)
    # bridge.server.run builds its loop with uvloop.new_event_loop, looked up at each call.
    uvloop.new_event_loop = probed(uvloop.new_event_loop, args.probe_file)
    return bridge_main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
