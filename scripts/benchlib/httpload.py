"""An HTTP/1.1 load client on raw asyncio streams: keep-alive connections in a pool,
Content-Length and chunked bodies, arrival time of every SSE event.

Kept deliberately small: a general client (httpx, aiohttp) costs more CPU per request
than the router under test would, and on a 2-core machine that skews the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

now = time.perf_counter


@dataclass(slots=True)
class Result:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    # Arrival time (perf_counter) of each SSE data event other than [DONE].
    event_times: list[float] = field(default_factory=list)
    events: list[bytes] = field(default_factory=list)  # their payloads, when kept


class Conn:
    extra_headers = b""  # header lines ("name: value\r\n") every request carries

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, f"{host}:{port}".encode())

    def close(self) -> None:
        self.reusable = False
        self.writer.close()

    async def post(self, path: str, body: bytes, *, keep_events: bool = False,
                   on_event: Callable[[float], None] | None = None) -> Result:
        self.writer.write(
            b"POST %s HTTP/1.1\r\nhost: %s\r\n%scontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), self.host, self.extra_headers,
                                                 len(body), body))
        return await self._response(keep_events, on_event)

    async def get(self, path: str) -> Result:
        self.writer.write(b"GET %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (path.encode(), self.host))
        return await self._response(False, None)

    async def _response(self, keep_events: bool,
                        on_event: Callable[[float], None] | None) -> Result:
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"connection", b"").lower() == b"close":
            self.reusable = False
        result = Result(status, headers)
        length = headers.get(b"content-length")
        if length is not None:
            result.body = await reader.readexactly(int(length))
            return result
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            self.reusable = False
            result.body = await reader.read()
            return result
        buf = b""
        sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if not sse:
                parts.append(data)
                continue
            t = now()
            buf += data
            while (cut := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:cut], buf[cut + 2:]
                if event.startswith(b"data:") and event[5:].strip() != b"[DONE]":
                    result.event_times.append(t)
                    if on_event is not None:
                        on_event(t)
                    if keep_events:
                        result.events.append(event[5:].strip())
        result.body = b"".join(parts)
        return result


class Pool:
    """Idle keep-alive connections to one server; a new one is opened when none is idle,
    so an open-loop sender is never held back by the pool.

    Servers close keep-alive connections that sat idle a while (uvicorn: after 5 s), so a
    connection idle longer than `max_idle_s` is not reused, and a reused one that turns
    out closed before any byte of the answer is retried once on a new connection.
    """

    def __init__(self, host: str, port: int, max_idle_s: float = 3.0) -> None:
        self.host = host
        self.port = port
        self.max_idle_s = max_idle_s
        self.idle: list[tuple[float, Conn]] = []
        self.opened = 0

    async def warm(self, n: int) -> None:
        conns = await asyncio.gather(*(Conn.open(self.host, self.port) for _ in range(n)))
        self.opened += n
        at = now()
        self.idle.extend((at, c) for c in conns)

    async def _get(self) -> tuple[Conn, bool]:
        while self.idle:
            since, conn = self.idle.pop()
            if now() - since <= self.max_idle_s and not conn.reader.at_eof():
                return conn, True
            conn.close()
        self.opened += 1
        return await Conn.open(self.host, self.port), False

    async def post(self, path: str, body: bytes, *, keep_events: bool = False) -> Result:
        conn, reused = await self._get()
        try:
            result = await conn.post(path, body, keep_events=keep_events)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            conn.close()
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
            # The server had closed it while it sat idle: nothing was processed.
            conn = await Conn.open(self.host, self.port)
            self.opened += 1
            try:
                result = await conn.post(path, body, keep_events=keep_events)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if conn.reusable:
            self.idle.append((now(), conn))
        else:
            conn.close()
        return result

    def close(self) -> None:
        for _, conn in self.idle:
            conn.close()
        self.idle.clear()


async def on_schedule(rate: float, n: int) -> AsyncIterator[tuple[int, float, float | None]]:
    """Open-loop send times start + i/rate: yields (i, scheduled time, how late the
    sender was, or None when it was on time)."""
    start = now() + 0.01
    for i in range(n):
        scheduled = start + i / rate
        wait = scheduled - now()
        if wait > 0:
            await asyncio.sleep(wait)
        yield i, scheduled, None if wait > 0 else -wait
