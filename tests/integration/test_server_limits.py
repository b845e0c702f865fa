"""The server `spillover serve` runs (router/http/server.py), served for real by uvicorn: what a
connection may cost before it has sent a request. A stranger needs no key to open one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest
import uvicorn

from router.app import Settings, create_app
from router.http.server import server_config
from tests.unit.helpers import config

LOOPS = pytest.mark.both_loops

MB = 1 << 20
# An outage, not a speed target: an ordinary request answered within this, whatever else
# the server is being sent.
ANSWERED_WITHIN_S = 5.0


@contextlib.asynccontextmanager
async def serving(**server: Any) -> AsyncIterator[tuple[str, int]]:
    cfg = config(server={"request_timeout_s": 5, "metrics_interval_s": 60,
                         "ledger_path": ":memory:", **server})
    app = create_app(Settings(env={}), config=cfg)
    srv = uvicorn.Server(server_config(app, cfg.server, host="127.0.0.1", port=0,
                                       log_level="warning"))
    task = asyncio.create_task(srv.serve())
    try:
        for _ in range(250):
            if srv.started:
                break
            await asyncio.sleep(0.02)
        assert srv.started
        yield "127.0.0.1", srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def read_all(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[bytes, bool]:
    """What the server sends until it closes; True if it did close within `within`."""
    got = bytearray()
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            piece = await asyncio.wait_for(reader.read(65536), left)
            if not piece:
                return bytes(got), True
            got += piece
    except ConnectionError:  # a reset is a close too
        return bytes(got), True
    except TimeoutError:
        pass
    return bytes(got), False


async def healthz(host: str, port: int) -> float:
    """Seconds an ordinary request takes on a fresh connection."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    answer, _ = await read_all(reader, ANSWERED_WITHIN_S)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"status": "ok"}
    return time.monotonic() - started


async def flood(host: str, port: int, total: int) -> tuple[bytes, bool, int]:
    """One connection sending a header that never ends, `total` bytes of it, as fast as
    the server takes them; what it answered, whether it closed, and bytes sent."""
    reader, writer = await asyncio.open_connection(host, port)
    answer = asyncio.create_task(read_all(reader, 30))
    piece = b"a" * MB  # the same buffer every time: the client itself stays small
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-junk: ")
    sent = 0
    try:
        while sent < total and not answer.done():
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    except ConnectionError:
        pass
    got, closed = await answer
    writer.close()
    return got, closed, sent


def error_of(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    assert b"connection: close" in head.lower(), head
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@LOOPS
async def test_huge_unfinished_headers_get_431_and_memory_stays_bounded() -> None:
    me = psutil.Process()
    async with serving() as (host, port):
        await healthz(host, port)  # warm: the first request's allocations are not the flood's
        base = me.memory_info().rss
        peak = base
        latencies: list[float] = []

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, me.memory_info().rss)
                latencies.append(await healthz(host, port))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(flood(host, port, 100 * MB) for _ in range(4)))
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        peak = max(peak, me.memory_info().rss)
        # Still serving afterwards.
        latencies.append(await healthz(host, port))

    for got, closed, _sent in results:
        assert got.startswith(b"HTTP/1.1 431 "), got[:200]
        error = error_of(got)
        assert error["code"] == "request_header_fields_too_large"
        assert "65536 bytes" in error["message"]
        assert closed
    # Unbounded, four 100 MB headers held by the parser are 400 MB and more (the issue
    # measured 92 -> 499 MB); bounded, each connection holds at most one read.
    assert peak - base < 64 * MB, f"RSS grew {(peak - base) / MB:.0f} MB"
    assert latencies and max(latencies) < ANSWERED_WITHIN_S


@LOOPS
async def test_a_trickled_header_is_cut_off_at_the_header_timeout() -> None:
    async with serving(header_timeout_s=0.5) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        answer = asyncio.create_task(read_all(reader, ANSWERED_WITHIN_S))
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        with contextlib.suppress(ConnectionError):
            while not answer.done() and time.monotonic() - started < ANSWERED_WITHIN_S:
                writer.write(b"a")  # one byte every 50 ms: never a whole head
                await writer.drain()
                await asyncio.sleep(0.05)
        got, closed = await answer
        elapsed = time.monotonic() - started
        # Beside it, an ordinary request is answered.
        assert await healthz(host, port) < ANSWERED_WITHIN_S
        writer.close()
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert error_of(got)["code"] == "request_timeout"
    assert closed
    assert 0.4 < elapsed < ANSWERED_WITHIN_S


@LOOPS
async def test_a_connection_that_sends_nothing_is_closed() -> None:
    async with serving(header_timeout_s=0.5) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        got, closed = await read_all(reader, ANSWERED_WITHIN_S)
        elapsed = time.monotonic() - started
        writer.close()
    assert (got, closed) == (b"", True)
    assert 0.4 < elapsed < ANSWERED_WITHIN_S


@LOOPS
async def test_an_idle_keep_alive_connection_is_closed() -> None:
    async with serving(keep_alive_s=1, header_timeout_s=30) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWERED_WITHIN_S)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), ANSWERED_WITHIN_S)
        started = time.monotonic()
        got, closed = await read_all(reader, ANSWERED_WITHIN_S)
        elapsed = time.monotonic() - started
        writer.close()
    assert (got, closed) == (b"", True)
    assert 0.8 < elapsed < ANSWERED_WITHIN_S


@LOOPS
async def test_heads_within_the_limit_are_served_however_many_and_however_split() -> None:
    """The count is per request head: a keep-alive connection carrying far more header
    bytes in all than one head may have is served, and so is a head that arrives in
    pieces (each within the timeout), a body between heads included."""
    async with serving(max_header_bytes=4096, header_timeout_s=2) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)

        async def answer() -> bytes:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWERED_WITHIN_S)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), ANSWERED_WITHIN_S)
            return head

        filler = b"x-filler: " + b"f" * 3000 + b"\r\n"
        for _ in range(20):  # 20 x 3 KB heads: 60 KB on one connection
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + filler + b"\r\n")
            assert (await answer()).startswith(b"HTTP/1.1 200")
        # POSTs with bodies (404s: no such path), the second's 200 KB read with its head:
        # body bytes are not head bytes. Then a head in three pieces.
        writer.write(b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        assert (await answer()).startswith(b"HTTP/1.1 404")
        writer.write(b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n"
                     + b"b" * 200_000)
        assert (await answer()).startswith(b"HTTP/1.1 404")
        for piece in (b"GET /healthz HTTP/1.1\r\nhost: x\r\n", filler, b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.3)
        assert (await answer()).startswith(b"HTTP/1.1 200")
        # Over the configured limit: 431, with the configured figure.
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + filler + filler + b"\r\n")
        got, closed = await read_all(reader, ANSWERED_WITHIN_S)
        writer.close()
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert "4096 bytes" in error_of(got)["message"]
    assert closed


@LOOPS
async def test_a_head_trickled_after_a_first_request_is_cut_off_too() -> None:
    """Between requests the keep-alive timer runs, and the first byte of a new head stops
    it: from there the head has its own deadline."""
    async with serving(header_timeout_s=0.5, keep_alive_s=30) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWERED_WITHIN_S)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readexactly(15), ANSWERED_WITHIN_S)  # {"status":"ok"}
        started = time.monotonic()
        answer = asyncio.create_task(read_all(reader, ANSWERED_WITHIN_S))
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        with contextlib.suppress(ConnectionError):
            while not answer.done() and time.monotonic() - started < ANSWERED_WITHIN_S:
                writer.write(b"x-a: b\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        got, closed = await answer
        elapsed = time.monotonic() - started
        writer.close()
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert closed
    assert 0.4 < elapsed < ANSWERED_WITHIN_S
