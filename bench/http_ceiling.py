"""The HTTP-side ceiling: an aiohttp handler that reads the body and answers 200.

Nothing is verified or published, so its numbers bound what any aiohttp
service on this machine can do, whatever happens after the body is read.

Run: ``python -m bench.http_ceiling --port 8081``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiohttp import web

from bench.serving import serve
from bench.signed_requests import WEBHOOK_PATH

_ANSWER = b'{"outcome":"published"}'


async def read_and_answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_ANSWER, content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, read_and_answer)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_ceiling")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    return serve(create_app(), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
