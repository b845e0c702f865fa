"""Slow readers must not take the router from everyone: many callers each holding a large
stream open and reading it a trickle at a time, while ordinary requests to another alias
are still answered (a generous bound, seconds: an outage detector, not a timing target);
and a caller holding its cap of streams open gets 429 for one more, until one ends.

Served as in production (uvicorn, the engines' HTTP/1.1 client, a real loopback engine)
on both loops: under back-pressure the engine client hands the relay pieces of megabytes,
which is where a framer that rescans its buffer per event goes quadratic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web

from router.app import Settings, create_app
from router.config import Config
from router.routing.auth import key_digest
from tests.integration.test_served_gateway import BULK_EVENTS, Engine, _engine_app
from tests.unit.helpers import config

pytestmark = pytest.mark.both_loops

SLOW_READERS = 12
KEY = "sk-spill-slow-reader-test"


def two_aliases(port: int, callers: dict[str, Any] | None = None) -> Config:
    """`demo` (where the slow readers stream) and `other` (ordinary requests), both on
    the one loopback engine."""
    data: dict[str, Any] = {
        "server": {"request_timeout_s": 60, "metrics_interval_s": 60, "ledger_path": ":memory:"},
        "aliases": {
            name: {"local": [{"name": f"{name}-local", "model": f"/models/{name}",
                              "license": "apache-2.0", "served_model_name": "demo",
                              "base_url": f"http://127.0.0.1:{port}/v1",
                              "saturation": {"max_inflight": 64, "max_waiting": 1000}}]}
            for name in ("demo", "other")},
    }
    if callers:
        data["callers"] = callers
    import yaml

    return config(yaml.safe_dump(data))


@contextlib.asynccontextmanager
async def serving(callers: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, Any]]:
    engine = Engine()
    runner = web.AppRunner(await _engine_app(engine), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    engine.port = runner.addresses[0][1]
    app = create_app(Settings(env={}), config=two_aliases(engine.port, callers))
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


async def open_stream(url: str, body: dict[str, Any], key: str | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw caller with a small receive buffer; returns once the response head is in."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    raw = json.dumps(body).encode()
    auth = b"authorization: Bearer %s\r\n" % key.encode() if key else b""
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n%s"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (auth, len(raw), raw))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


BULK = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "bulk": True}
ORDINARY = {"model": "other", "messages": [{"role": "user", "content": "hello"}]}


async def test_slow_readers_leave_the_router_to_everyone_else() -> None:
    async with serving() as (url, runtime):
        readers = [await open_stream(url, BULK) for _ in range(SLOW_READERS)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in readers)
        stop = asyncio.Event()
        got = [0] * SLOW_READERS

        async def trickle(i: int, reader: asyncio.StreamReader) -> None:
            while not stop.is_set():  # 1 KB every 50 ms: ~20 KB/s of a ~12 MB stream
                data = await reader.read(1024)
                if not data:
                    return
                got[i] += len(data)
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(trickle(i, r)) for i, (r, _, _) in enumerate(readers)]
        try:
            await asyncio.sleep(0.5)  # the engine has sent everything; buffers are full
            assert runtime.monitor.status()["demo-local"]["inflight"] == SLOW_READERS
            async with httpx.AsyncClient(base_url=url, trust_env=False,
                                         timeout=httpx.Timeout(10.0)) as c:
                for _ in range(10):
                    # Generous: an ordinary request answers in milliseconds here; the
                    # quadratic framer took seconds to minutes under this load.
                    r = await asyncio.wait_for(c.post("/v1/chat/completions", json=ORDINARY),
                                               5)
                    assert r.status_code == 200, r.text
                    assert r.json()["choices"][0]["message"]["content"] == "local answer"
                    await asyncio.sleep(0.05)
            assert all(n > 0 for n in got)  # the slow readers were being served meanwhile
        finally:
            stop.set()
            for _, writer, _ in readers:
                writer.close()
            await asyncio.wait(tasks, timeout=5)
        # Every slow reader hung up: their streams end, the engine's count comes back.
        for _ in range(100):
            if runtime.monitor.status()["demo-local"]["inflight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert runtime.monitor.status()["demo-local"]["inflight"] == 0
        assert runtime.gateway.streams.open("anonymous") == 0


async def test_a_caller_over_its_stream_cap_gets_429_until_one_ends() -> None:
    callers = {"app": {"key_sha256": [key_digest(KEY)], "max_concurrent_streams": 3}}
    async with serving(callers) as (url, runtime):
        held = [await open_stream(url, BULK, KEY) for _ in range(3)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in held)
        assert runtime.gateway.streams.open("app") == 3
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10.0,
                                     headers={"authorization": f"Bearer {KEY}"}) as c:
            r = await c.post("/v1/chat/completions", json={**BULK, "bulk": False,
                                                           "short": True})
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["code"] == "too_many_streams" and err["type"] == "rate_limit_error"
            assert "3 streams" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
            # Not a stream: not counted against the cap.
            r = await c.post("/v1/chat/completions", json=ORDINARY)
            assert r.status_code == 200, r.text
            # One stream ends (its caller hangs up): its slot comes back.
            held.pop()[1].close()
            for _ in range(100):
                if runtime.gateway.streams.open("app") == 2:
                    break
                await asyncio.sleep(0.05)
            assert runtime.gateway.streams.open("app") == 2
            r = await c.post("/v1/chat/completions", json={**BULK, "bulk": False,
                                                           "short": True})
            assert r.status_code == 200, r.text
            assert r.text.count('"content": "tok"') == 5
        assert runtime.gateway.streams.open("app") == 2  # the finished stream gave it back
        for _, writer, _ in held:
            writer.close()
        for _ in range(100):
            if runtime.gateway.streams.open("app") == 0:
                break
            await asyncio.sleep(0.05)
        assert runtime.gateway.streams.open("app") == 0
        assert BULK_EVENTS > 1000  # the held streams were far from done
