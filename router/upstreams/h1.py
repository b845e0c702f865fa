"""HTTP/1.1 to plain-HTTP upstreams (the local engines), on asyncio and httptools.

The hop to a local engine is on the path of every local request and every streamed
token, so it is kept to what that hop needs: a kept-alive connection taken from a list,
the request written in one piece, the answer parsed by llhttp (httptools, which uvicorn
already uses to parse what callers send) and handed over as it arrives. On the streaming
benchmark aiohttp's client took far longer between being called and writing the request
(figures: docs/performance.md). TLS (the hosted APIs) stays with a general client.

Kept-alive connections the upstream closed are dropped as soon as it says so; one that
dies under a request before any byte of the answer is retried once on a new connection
(the race every keep-alive client has with a server's idle timeout).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from router.config import Timeouts
from router.upstreams.transport import TransportError, Upstream, UpstreamResponse

_HIGH_WATER = 1 << 20  # buffered answer bytes at which reading from the upstream pauses
# A timer that runs this much after its time says the process was not scheduled (a host
# whose CPUs an engine saturates), not that the upstream is slow: it waits _GRACE_S more,
# once, so that what the upstream has already sent is read before anyone is blamed.
_LATE_S = 0.2
_GRACE_S = 0.05


class Headers(Mapping[str, str]):
    """Response headers, looked up case-insensitively (names are stored lower-case)."""

    __slots__ = ("_d",)

    def __init__(self, d: dict[str, str]) -> None:
        self._d = d

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._d.get(name.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _Conn(asyncio.Protocol):
    """One connection: at most one request on it at a time."""

    def __init__(self, pool: _Origin) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.resp: H1Response | None = None
        self.head: asyncio.Future[H1Response] | None = None
        self.received = False  # any byte of the current answer
        self._status = 0
        self._headers: dict[str, str] = {}
        self._length_known = False
        self.keep_alive = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.head is None and self.resp is None:
            self.abort()  # bytes nobody asked for: the connection is not in a known state
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(type(exc).__name__))
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        resp = self.resp
        if resp is not None and not resp.done and not self._length_known:
            resp.finish()  # a body delimited by the connection's end has ended
            return
        self._fail(TransportError("ServerDisconnectedError"))

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = {}
        self._length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in ("content-length", "transfer-encoding"):
            self._length_known = True
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue): the real one follows
        self.resp = H1Response(self, status, Headers(self._headers))
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_result(self.resp)

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp.feed(body)

    def on_message_complete(self) -> None:
        # Asked here: once the message is over, llhttp no longer answers for it.
        self.keep_alive = self.parser.should_keep_alive()
        if self.resp is not None:
            self.resp.finish()

    # -- helpers -------------------------------------------------------------------------

    def _fail(self, err: TransportError) -> None:
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_exception(err)
        if self.resp is not None and not self.resp.done:
            self.resp.fail(err)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)


class H1Response:
    """The answer on a connection: status and headers at once, the body as it arrives."""

    def __init__(self, conn: _Conn, status: int, headers: Headers) -> None:
        self._conn = conn
        self.status = status
        self.headers: Mapping[str, str] = headers
        self._buf: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._paused = False
        self.done = False
        self._error: TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._read_s = 0.0
        self._deadline = 0.0

    # fed by the connection
    def feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()  # the reader is slow: let TCP push back
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, err: TransportError) -> None:
        self._error = err
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _timed_out(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(TransportError("ReadTimeout", timeout=True))

    async def _more(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._deadline:
            raise TransportError("ReadTimeout", timeout=True)
        self._waiter = loop.create_future()
        timer = _Deadline(loop, min(now + self._read_s, self._deadline), self._timed_out)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _take(self) -> bytes:
        buf = self._buf
        data = buf.popleft() if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self._size = 0
        if self._paused and self._conn.transport is not None and not self._conn.closed:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    # the UpstreamResponse interface
    async def chunks(self) -> AsyncIterator[bytes]:
        """Everything buffered is handed over at once: a burst from the upstream (the last
        token, the usage, [DONE]) becomes one piece, not one per network read."""
        while True:
            if self._buf:
                yield self._take()
            elif self._error is not None:
                raise self._error
            elif self.done:
                return
            else:
                await self._more()

    async def read(self) -> bytes:
        parts = []
        try:
            async for chunk in self.chunks():
                parts.append(chunk)
        finally:
            await self.aclose()
        return b"".join(parts)

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        if self.done and self._error is None and conn.keep_alive:
            conn.pool.release(conn)
        else:
            # Before the end of the body this closes the connection: that is what tells
            # a vLLM engine to stop generating.
            conn.abort()
            conn.pool.free_slot()


class _Origin:
    """Idle connections to one host:port, newest first."""

    def __init__(self, owner: H1Upstream, host: str, port: int) -> None:
        self.owner = owner
        self.host = host
        self.port = port
        self.idle: list[_Conn] = []

    def forget(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def release(self, conn: _Conn) -> None:
        conn.resp = None
        conn.head = None
        conn.idle_since = time.monotonic()
        if not conn.closed:
            self.idle.append(conn)
        self.free_slot()

    def free_slot(self) -> None:
        self.owner.slots.release()


class H1Upstream:
    """The Upstream interface for http:// URLs; https:// ones go to `tls`."""

    def __init__(self, *, max_connections: int, tls: Upstream | None = None,
                 keepalive_s: float = 30.0) -> None:
        self._keepalive = keepalive_s
        self._tls = tls
        self._origins: dict[tuple[str, int], _Origin] = {}
        self._prefix: dict[str, tuple[_Origin, bytes]] = {}
        self.slots = asyncio.Semaphore(max_connections)

    async def start(self) -> None:
        if self._tls is not None:
            await self._tls.start()

    async def aclose(self) -> None:
        for origin in self._origins.values():
            for conn in list(origin.idle):
                conn.abort()
        if self._tls is not None:
            await self._tls.aclose()

    def _route(self, url: str) -> tuple[_Origin, bytes] | None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        port = parts.port or 80
        key = (parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(self, parts.hostname, port)
        host = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return origin, b"POST %s HTTP/1.1\r\nhost: %s\r\n" % (target.encode(), host.encode())

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, remaining_s: float) -> UpstreamResponse:
        routed = self._prefix.get(url)
        if routed is None:
            found = self._route(url)
            if found is None:
                if self._tls is None:
                    raise TransportError("UnsupportedURL", connect=True)
                return await self._tls.post(url, content, headers, timeouts, remaining_s)
            routed = self._prefix[url] = found
        origin, start = routed
        parts = [start]
        try:
            for name, value in headers.items():
                if "\r" in value or "\n" in value:
                    raise ValueError(name)
                parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        except ValueError:  # a line break, or a character HTTP/1.1 headers cannot carry
            raise TransportError("InvalidHeader", connect=True) from None
        parts.append(b"content-length: %d\r\n\r\n" % len(content))
        parts.append(content)
        request = b"".join(parts)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.001, remaining_s)
        await self._slot(timeouts, deadline)
        try:
            conn = self._idle(origin)
            try:
                if conn is not None:
                    try:
                        return await self._exchange(conn, request, timeouts, deadline)
                    except TransportError as exc:
                        if conn.received or exc.timeout or exc.kind != "ServerDisconnectedError":
                            raise
                        # A kept-alive connection the upstream had already closed.
                conn = await self._connect(origin, timeouts, deadline)
                return await self._exchange(conn, request, timeouts, deadline)
            except BaseException:
                if conn is not None:
                    conn.abort()
                raise
        except BaseException:
            self.slots.release()
            raise

    async def _slot(self, timeouts: Timeouts, deadline: float) -> None:
        if not self.slots.locked():
            await self.slots.acquire()  # free: does not suspend
            return
        wait = min(timeouts.pool, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, wait))
        except TimeoutError:
            raise TransportError("PoolTimeout", connect=True, timeout=True) from None

    def _idle(self, origin: _Origin) -> _Conn | None:
        idle = origin.idle
        oldest = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= oldest:
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: _Origin, timeouts: Timeouts, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn(origin)
        wait = max(0.001, min(timeouts.connect, deadline - loop.time()))
        connecting = loop.create_task(
            loop.create_connection(lambda: conn, origin.host, origin.port))
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            connecting.cancel()

        timer = _Deadline(loop, loop.time() + wait, expire)
        try:
            await connecting
        except asyncio.CancelledError:
            conn.abort()  # in case the connection was made as the cancellation came
            if not expired:
                raise
            raise TransportError("ConnectTimeout", connect=True, timeout=True) from None
        except OSError as exc:
            raise TransportError(type(exc).__name__, connect=True) from None
        finally:
            timer.cancel()
        return conn

    async def _exchange(self, conn: _Conn, request: bytes, timeouts: Timeouts,
                        deadline: float) -> H1Response:
        loop = asyncio.get_running_loop()
        conn.received = False
        head: asyncio.Future[H1Response] = loop.create_future()
        conn.head = head
        assert conn.transport is not None
        conn.transport.write(request)
        timer = _Deadline(loop, min(loop.time() + timeouts.read, deadline),
                          lambda: _expire(head))
        try:
            resp = await head
        finally:
            timer.cancel()
        resp._read_s = timeouts.read
        resp._deadline = deadline
        return resp


def _expire(fut: asyncio.Future[H1Response]) -> None:
    if not fut.done():
        fut.set_exception(TransportError("ReadTimeout", timeout=True))


class _Deadline:
    """`loop.call_at(due, fire)` that forgives this process's own lateness (_LATE_S)."""

    __slots__ = ("_due", "_fire", "_graced", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, due: float,
                 fire: Callable[[], None]) -> None:
        self._loop = loop
        self._due = due
        self._fire = fire
        self._graced = False
        self._handle = loop.call_at(due, self._run)

    def _run(self) -> None:
        if not self._graced and self._loop.time() - self._due > _LATE_S:
            self._graced = True
            self._handle = self._loop.call_later(_GRACE_S, self._run)
            return
        self._fire()

    def cancel(self) -> None:
        self._handle.cancel()
