#!/usr/bin/env python3
"""The floor under spillover: the same server, client and stream writer, nothing between.

    python scripts/benchlib/bareproxy.py --port 9200 --upstream http://127.0.0.1:9100

uvicorn (uvloop, httptools) in front, spillover's engine client (router/upstreams/h1.py) behind and
its stream writer (router/http/streaming.py), joined by a bare ASGI function: no parsing,
routing, auth, accounting or logging. What it adds over talking to the upstream directly
is the cost of one more process hop with this stack; what spillover adds over it is the
cost of being a gateway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from router.config import Timeouts
from router.http.streaming import EventStream
from router.upstreams.h1 import H1Upstream
from router.upstreams.transport import UpstreamResponse

TIMEOUTS = Timeouts(connect=5, read=60, write=5, pool=5)


def build(upstream: str) -> Any:
    client = H1Upstream(max_connections=2048)

    async def relay(resp: UpstreamResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.chunks():
                yield chunk
        finally:
            await resp.aclose()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        resp = await client.post(upstream + scope["path"], body,
                                 {"content-type": "application/json"}, TIMEOUTS, 60.0)
        ctype = resp.headers.get("content-type") or "application/json"
        if not ctype.startswith("text/event-stream"):
            data = await resp.read()
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", ctype.encode()),
                                    (b"content-length", b"%d" % len(data))]})
            await send({"type": "http.response.body", "body": data})
            return
        await EventStream(relay(resp), resp.status, {})(scope, receive, send)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    uvicorn.run(build(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False,
                proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
