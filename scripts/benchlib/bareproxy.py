#!/usr/bin/env python3
"""The floor under any Python gateway: a pass-through proxy that only forwards.

    python scripts/benchlib/bareproxy.py --port 9200 --upstream http://127.0.0.1:9100

aiohttp server and client on uvloop, one keep-alive pool, the body and the SSE chunks
forwarded untouched: no parsing, routing, auth, accounting or logging. What it adds over
talking to the upstream directly is the cost of one more process hop on this machine;
what spillover adds over it is the cost of being a gateway.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web


def build(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["client"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=60), skip_auto_headers=("User-Agent",))

    async def stop(app: web.Application) -> None:
        await app["client"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        client: aiohttp.ClientSession = app["client"]
        async with client.post(upstream + request.path, data=body,
                               headers={"content-type": "application/json"}) as up:
            if up.content_type != "text/event-stream":
                return web.Response(body=await up.read(), status=up.status,
                                    content_type=up.content_type)
            out = web.StreamResponse(status=up.status,
                                     headers={"content-type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    web.run_app(build(args.upstream), host="127.0.0.1", port=args.port, print=None,
                access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
