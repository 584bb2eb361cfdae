"""The ceiling of the webhook path: the daemon's own listener stack (``daemon.http.serve_asgi``,
hypercorn on trio) answering every POST with 200 after reading the body, with no verification,
no storage, no logging. Run: ``python bench/_ceiling_server.py --listen 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import trio

from trainguard import http

OK = json.dumps({"detail": "ok"}).encode() + b"\n"


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await http.lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    while True:  # read the whole body, as the real listener does
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            break
    await http.respond(send, 200, OK, content_type="application/json")


async def serve(listen: str) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(http.serve_asgi, app, listen)
        print(f"ceiling server on {address}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.listen)


if __name__ == "__main__":
    main()
