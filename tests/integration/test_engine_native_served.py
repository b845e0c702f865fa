"""Local engines' own Messages API over real sockets (issue 15): uvicorn in front, the
engines' HTTP/1.1 client behind, a loopback stand-in engine (aiohttp) that has or lacks
`POST /v1/messages`. aiohttp answers a GET on a POST-only route with 405 and an unknown
path with a plain-text 404, as any server would: what the router's probe reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from aiohttp import web

from router.app import Settings, create_app
from tests.unit.helpers import BASE_YAML, METRICS_IDLE, completion, config

EVENTS = 2_000
MSG = {"model": "demo", "max_tokens": 1024,
       "messages": [{"role": "user", "content": "hello"}]}
ANTHROPIC = {"anthropic-version": "2023-06-01"}


@dataclass
class Engine:
    messages: bool  # POST /v1/messages is a route
    probe_says: bool | None = None  # GET /v1/messages answered 405 even without the route
    port: int = 0
    posts: list[str] = field(default_factory=list)
    deltas_sent: int = 0
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)


def _ev(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


async def _engine_app(engine: Engine) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS_IDLE % {"waiting": 0, "kv": 0.1})

    async def chat(request: web.Request) -> web.Response:
        engine.posts.append(request.path)
        return web.json_response(completion("demo", "chat answer"))

    async def messages(request: web.Request) -> web.StreamResponse:
        engine.posts.append(request.path)
        body = await request.json()
        start = {"id": "chatcmpl-1", "type": "message", "role": "assistant", "content": [],
                 "model": body["model"], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": 9, "output_tokens": 0}}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(_ev("message_start", {"type": "message_start", "message": start}))
            await resp.write(_ev("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}))
            for i in range(EVENTS if body.get("stream") else 0):
                await resp.write(_ev("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": f"t{i}"}}))
                engine.deltas_sent += 1
                await asyncio.sleep(0.001)
            await resp.write(_ev("message_stop", {"type": "message_stop"}))
        except (ConnectionResetError, asyncio.CancelledError):
            engine.hung_up.set()
            raise
        return resp

    async def method_not_allowed(request: web.Request) -> web.Response:
        return web.Response(status=405)

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="404: Not Found")  # aiohttp's own

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    if engine.messages:
        app.router.add_post("/v1/messages", messages)
    elif engine.probe_says:  # the route went away after the probe (say, a restart)
        app.router.add_get("/v1/messages", method_not_allowed)
        app.router.add_post("/v1/messages", not_found)
    return app


@contextlib.asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[tuple[str, Any]]:
    runner = web.AppRunner(await _engine_app(engine), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    engine.port = runner.addresses[0][1]
    cfg = config(BASE_YAML.replace("port: 8101", f"port: {engine.port}"))
    app = create_app(Settings(env={}), config=cfg)  # no transport: the real clients
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on",
                                           log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(250):
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", app.state.runtime
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        await runner.cleanup()


def run(scenario: Any) -> None:
    with asyncio.Runner() as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


def test_caller_hanging_up_mid_native_stream_stops_the_engine() -> None:
    async def scenario() -> None:
        engine = Engine(messages=True)
        async with serving(engine) as (url, runtime):
            status = runtime.monitor.status()["demo-local"]["apis"]["messages"]
            assert status["native"] is True and status["how"].endswith("answered 405")
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({**MSG, "stream": True}).encode()
            writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n"
                         b"content-type: application/json\r\nanthropic-version: 2023-06-01"
                         b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            got = b""
            while got.count(b"content_block_delta") < 10:
                got += await asyncio.wait_for(reader.read(4096), 5)
            assert got.startswith(b"HTTP/1.1 200")
            assert b"x-spillover-upstream-api: messages" in got
            writer.close()  # the caller hangs up mid-stream
            await asyncio.wait_for(engine.hung_up.wait(), 5)
            assert engine.deltas_sent < EVENTS
            for _ in range(100):
                if runtime.recorder.recent:
                    break
                await asyncio.sleep(0.05)
            last = runtime.recorder.recent[0]
            assert last["status"] == 499, last
            assert last["completion_tokens"] > 0  # estimated, as for a chat stream
            assert engine.posts == ["/v1/messages"]

    run(scenario)


def test_without_the_route_the_caller_gets_the_chat_answer() -> None:
    async def scenario() -> None:
        for engine in (Engine(messages=False), Engine(messages=False, probe_says=True)):
            async with serving(engine) as (url, runtime), httpx.AsyncClient(
                    base_url=url, trust_env=False) as c:
                r = await c.post("/v1/messages", json=MSG, headers=ANTHROPIC)
                assert r.status_code == 200, r.text
                assert r.headers["x-spillover-upstream-api"] == "chat"
                assert r.json()["content"] == [{"type": "text", "text": "chat answer"}]
                r = await c.post("/v1/messages", json=MSG, headers=ANTHROPIC)
                assert r.status_code == 200
                known = runtime.monitor.status()["demo-local"]["apis"]["messages"]
                assert known["native"] is False
            if engine.probe_says:  # the probe said yes; the first POST found no route
                assert known["how"] == "POST /v1/messages answered 404"
                assert engine.posts == ["/v1/chat/completions"] * 2
            else:
                assert known["how"] == "GET /v1/messages answered 404"
                assert engine.posts == ["/v1/chat/completions"] * 2

    run(scenario)
