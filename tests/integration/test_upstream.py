"""The hot-path HTTP clients against a real loopback server: both implementations keep
one contract (status, headers, whole and streamed bodies, one error type, deadlines,
a close that reaches the upstream)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from router.config import Timeouts
from router.upstreams.h1 import H1Upstream
from router.upstreams.transport import AiohttpUpstream, HttpxUpstream, TransportError, Upstream

FAST = Timeouts(connect=1.0, read=2.0, write=1.0, pool=1.0)


@dataclass
class Server:
    url: str
    peers: list[str] = field(default_factory=list)  # client address of every request
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0


async def _app(server: Server) -> web.Application:
    async def record(request: web.Request) -> None:
        server.peers.append(str(request.transport.get_extra_info("peername")
                                if request.transport else None))

    async def answer(request: web.Request) -> web.Response:
        await record(request)
        body = await request.read()
        return web.Response(body=b'{"echo":' + body + b"}", content_type="application/json",
                            headers={"X-Upstream": "yes"})

    async def limited(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=429, body=b'{"message":"slow down"}',
                            headers={"Retry-After": "7"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2.5)  # past FAST's read timeout; the server's teardown waits
        return web.Response(body=b"{}")

    async def stream(request: web.Request) -> web.StreamResponse:
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(200):
                await resp.write(b'data: {"i":%d}\n\n' % i)
                server.chunks_sent += 1
                await asyncio.sleep(0.01)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            server.stream_closed.set()
            raise
        return resp

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/answer", answer)
    app.router.add_post("/limited", limited)
    app.router.add_post("/slow", slow)
    app.router.add_post("/stream", stream)
    app.router.add_post("/cut", cut)
    return app


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(url="")
    runner = web.AppRunner(await _app(srv), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


Factory = Callable[[], Awaitable[tuple[Upstream, Callable[[], Awaitable[None]]]]]


async def _aiohttp() -> tuple[Upstream, Callable[[], Awaitable[None]]]:
    up = AiohttpUpstream(max_connections=8)
    await up.start()
    return up, up.aclose


async def _h1() -> tuple[Upstream, Callable[[], Awaitable[None]]]:
    up = H1Upstream(max_connections=8)
    await up.start()
    return up, up.aclose


async def _httpx() -> tuple[Upstream, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(trust_env=False)
    return HttpxUpstream(client), client.aclose


@pytest.fixture(params=[_h1, _aiohttp, _httpx], ids=["h1", "aiohttp", "httpx"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    up, close = await request.param()
    try:
        yield up
    finally:
        await close()


HEADERS = {"content-type": "application/json"}


async def test_whole_answer_status_headers_body(upstream: Upstream, server: Server) -> None:
    resp = await upstream.post(server.url + "/answer", b'{"a":1}', HEADERS, FAST, 5.0)
    assert resp.status == 200
    assert resp.headers.get("x-upstream") == "yes"  # case-insensitive
    assert await resp.read() == b'{"echo":{"a":1}}'


async def test_error_status_is_an_answer_not_a_transport_error(upstream: Upstream,
                                                                server: Server) -> None:
    resp = await upstream.post(server.url + "/limited", b"{}", HEADERS, FAST, 5.0)
    assert resp.status == 429
    assert resp.headers.get("retry-after") == "7"
    assert b"slow down" in await resp.read()


async def test_kept_alive_connection_is_reused(upstream: Upstream, server: Server) -> None:
    for _ in range(3):
        resp = await upstream.post(server.url + "/answer", b"{}", HEADERS, FAST, 5.0)
        await resp.read()
    assert len(server.peers) == 3
    assert len(set(server.peers)) == 1, server.peers


async def test_refused_connection_is_a_connect_error(upstream: Upstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(TransportError) as info:
        await upstream.post(f"http://127.0.0.1:{port}/answer", b"{}", HEADERS, FAST, 5.0)
    assert info.value.connect and not info.value.timeout


async def test_read_timeout(upstream: Upstream, server: Server) -> None:
    t = Timeouts(connect=1.0, read=0.2, write=1.0, pool=1.0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransportError) as info:
        resp = await upstream.post(server.url + "/slow", b"{}", HEADERS, t, 5.0)
        await resp.read()
    assert info.value.timeout and not info.value.connect
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_remaining_time_bounds_every_phase(upstream: Upstream, server: Server) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransportError) as info:
        resp = await upstream.post(server.url + "/slow", b"{}", HEADERS, FAST, 0.3)
        await resp.read()
    assert info.value.timeout
    assert asyncio.get_running_loop().time() - started < 1.5  # not the 2 s read timeout


async def test_stream_arrives_in_pieces_and_close_reaches_the_server(
        upstream: Upstream, server: Server) -> None:
    resp = await upstream.post(server.url + "/stream", b"{}", HEADERS, FAST, 10.0)
    assert resp.status == 200
    received = b""
    async for chunk in resp.chunks():
        received += chunk
        if received.count(b"\n\n") >= 3:
            break
    assert received.startswith(b'data: {"i":0}\n\n')
    await resp.aclose()
    # The upstream learns the caller is gone (for vLLM: stop generating).
    await asyncio.wait_for(server.stream_closed.wait(), 3.0)
    assert server.chunks_sent < 200


async def test_body_cut_midway_is_a_transport_error(upstream: Upstream,
                                                   server: Server) -> None:
    resp = await upstream.post(server.url + "/cut", b"{}", HEADERS, FAST, 5.0)
    assert resp.status == 200
    with pytest.raises(TransportError) as info:
        async for _ in resp.chunks():
            pass
    assert not info.value.connect
    await resp.aclose()
