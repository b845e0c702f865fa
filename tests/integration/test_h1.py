"""What the engines' HTTP/1.1 client does beyond the shared Upstream contract
(test_upstream.py): stale kept-alive connections, the pool's bound, cancellation,
back-pressure, bodies delimited by the connection's end, and TLS handed elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from router.config import Timeouts
from router.upstreams.h1 import H1Upstream
from router.upstreams.transport import TransportError

# Every test on both loops (tests/conftest.py): uvloop, which `spillover serve` runs,
# runs due timers before it looks at the sockets; asyncio looks first.
pytestmark = pytest.mark.both_loops

FAST = Timeouts(connect=1.0, read=2.0, write=1.0, pool=0.3)
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
Handler = Callable[[int, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Raw:
    """A raw HTTP server: `handler(conn_no, request_no, reader, writer)` answers one
    request and says whether to keep the connection."""

    handler: Handler
    url: str = ""
    connections: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no, n = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                n += 1
                self.requests.append((conn_no, head))
                if not await self.handler(conn_no, n, reader, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[Raw]:
    raw = Raw(handler)
    server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield raw


@pytest.fixture
async def h1() -> AsyncIterator[H1Upstream]:
    up = H1Upstream(max_connections=1)
    await up.start()
    try:
        yield up
    finally:
        await up.aclose()


def replying(answer: bytes, keep: bool = True) -> Handler:
    """A handler that writes `answer` to every request, keeping the connection or not."""
    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        w.write(answer)
        return keep

    return handler


ok = replying(OK)


async def test_a_stale_kept_alive_connection_is_replaced_once(h1: H1Upstream) -> None:
    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        if conn == 1 and n == 2:
            return False  # the server's idle timeout won the race: closed, no answer
        w.write(OK)
        return True

    async with raw_server(handler) as srv:
        for _ in range(2):
            resp = await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
            assert await resp.read() == b"{}"
    assert srv.connections == 2


async def test_a_new_connection_that_dies_is_not_retried(h1: H1Upstream) -> None:
    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        return False

    async with raw_server(handler) as srv:
        with pytest.raises(TransportError) as info:
            await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
    assert not info.value.timeout
    assert srv.connections == 1


async def test_an_answer_cut_after_its_first_byte_is_not_retried(h1: H1Upstream) -> None:
    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        if n == 2:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-le")
            return False
        w.write(OK)
        return True

    async with raw_server(handler) as srv:
        await (await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)).read()
        with pytest.raises(TransportError):
            await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
    assert srv.connections == 1  # sent once: the upstream may have acted on it


async def test_the_pool_bound_waits_then_times_out(h1: H1Upstream) -> None:
    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await r.readexactly(1)  # holds the stream open until the client leaves
        return False

    async with raw_server(handler) as srv:
        held = await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransportError) as info:
            await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
        assert info.value.connect and info.value.timeout  # nothing was sent
        assert asyncio.get_running_loop().time() - started < 1.5
        waiting = asyncio.create_task(h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await held.aclose()  # the slot goes to the one waiting
        resp = await asyncio.wait_for(waiting, 2.0)
        assert resp.status == 200
        await resp.aclose()


async def test_cancelled_while_waiting_for_the_answer_closes_and_frees(
        h1: H1Upstream) -> None:
    gone = asyncio.Event()

    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        if conn == 1:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await r.readexactly(1)
            gone.set()
            return False
        w.write(OK)
        return True

    async with raw_server(handler) as srv:
        task = asyncio.create_task(h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 2.0)  # the upstream saw the caller go
        resp = await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)  # the slot is free
        assert await resp.read() == b"{}"


async def test_connection_close_answer_is_not_reused(h1: H1Upstream) -> None:
    closing = replying(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
                       keep=False)
    async with raw_server(closing) as srv:
        for _ in range(2):
            assert await (await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)).read() \
                == b"{}"
    assert srv.connections == 2


async def test_body_delimited_by_the_connection_end(h1: H1Upstream) -> None:
    unframed = replying(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it",
                        keep=False)
    async with raw_server(unframed) as srv:
        resp = await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
        assert await resp.read() == b"all of it"


async def test_a_slow_reader_holds_the_upstream_back(h1: H1Upstream) -> None:
    sent = 0

    async def handler(conn: int, n: int, r: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        nonlocal sent
        total = 64 << 20
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"x" * (64 << 10)
        with contextlib.suppress(ConnectionError):
            while sent < total:
                w.write(block)
                await w.drain()  # blocks once the client stops reading
                sent += len(block)
        return False

    async with raw_server(handler) as srv:
        resp = await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)
        await asyncio.sleep(0.5)  # nobody reads
        assert sent < 16 << 20, sent  # buffers and socket windows, not the whole body
        await resp.aclose()


async def test_request_line_headers_and_body_as_sent(h1: H1Upstream) -> None:
    async with raw_server(ok) as srv:
        resp = await h1.post(srv.url + "/v1/chat/completions?x=1", b'{"a":1}',
                             {"authorization": "Bearer k", "x-request-id": "r1"}, FAST, 5.0)
        await resp.read()
    head = srv.requests[0][1].decode()
    assert head.startswith("POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert f"host: {srv.url.removeprefix('http://')}\r\n" in head
    assert "authorization: Bearer k\r\n" in head
    assert "content-length: 7\r\n" in head


async def test_header_values_cannot_inject_lines(h1: H1Upstream) -> None:
    async with raw_server(ok) as srv:
        for value in ("a\r\nx-evil: 1", "key-\u2603"):
            with pytest.raises(TransportError):
                await h1.post(srv.url + "/v1/x", b"{}", {"x-request-id": value}, FAST, 5.0)
        assert srv.requests == []
        # The refusal took no slot: the pool (of one) still serves.
        assert await (await h1.post(srv.url + "/v1/x", b"{}", {}, FAST, 5.0)).read() == b"{}"


class _Answering(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if not line:
                return
            self.rfile.read(length)
            self.wfile.write(OK)


@contextlib.contextmanager
def threaded_server() -> Iterator[str]:
    """Answers from its own thread, so it answers while the test's event loop is stuck."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Answering)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("stuck_after_s", [0.0, 0.05], ids=["connecting", "awaiting-answer"])
async def test_a_starved_process_does_not_blame_the_upstream(h1: H1Upstream,
                                                             stuck_after_s: float) -> None:
    """When the host gives this process no CPU for longer than a timeout (an engine
    saturating every core), the timer runs late; what the upstream already sent must be
    read before the upstream is called slow and the request failed over."""
    tight = Timeouts(connect=0.1, read=0.1, write=1.0, pool=1.0)
    with threaded_server() as url:
        task = asyncio.create_task(h1.post(url + "/v1/x", b"{}", {}, tight, 5.0))
        await asyncio.sleep(stuck_after_s)
        time.sleep(0.5)  # noqa: ASYNC251 - the loop stuck, as when the process is starved
        resp = await asyncio.wait_for(task, 2.0)
        assert await resp.read() == b"{}"


async def test_a_silent_upstream_still_times_out_after_a_stall(h1: H1Upstream) -> None:
    async def silent(conn: int, n: int, r: asyncio.StreamReader,
                     w: asyncio.StreamWriter) -> bool:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await r.readexactly(1)
        return False

    tight = Timeouts(connect=0.1, read=0.1, write=1.0, pool=1.0)
    async with raw_server(silent) as srv:
        task = asyncio.create_task(h1.post(srv.url + "/v1/x", b"{}", {}, tight, 5.0))
        await asyncio.sleep(0.05)
        time.sleep(0.5)  # noqa: ASYNC251 - the loop stuck on purpose
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(task, 2.0)
    assert info.value.timeout
