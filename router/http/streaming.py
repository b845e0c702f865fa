"""The relayed event stream as an ASGI response, lighter than Starlette's.

Starlette's StreamingResponse starts a task group with a task for the body and one that
listens for the caller hanging up, so the first event waits for a new task to be
scheduled. Here the body is written from the request's own task, at once, and a small
watcher task cancels that task when the caller goes away: the relay then closes the
upstream (which stops the engine) and books what was generated.

The status line and headers go out in the same TCP segment as the first event: an ASGI
server writes them on `http.response.start`, a write of its own, and on a virtual machine
each write that wakes the reader costs tens of microseconds on both sides. Where the
server's socket can be reached (uvicorn: through its `receive`), it is corked from the
start until the first event is written; elsewhere nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux


class Relay:
    """A relayed stream's body and the clean-up that ends it, which `aclose()` always runs,
    exactly once.

    The clean-up (release the engine's in-flight slot and the upstream connection, settle
    the budget hold, write the ledger row) cannot live only in the body generator's
    `finally`: `aclose()` on an async generator that never started skips its `finally`,
    and that is what happens when building the response or sending its start fails (a
    header that is not latin-1; an ASGI server whose `send` raises on a connection the
    caller already closed). The body may run `end` itself when it finishes (to book
    with the status it knows); `end` must be idempotent.
    """

    __slots__ = ("_body", "_end")

    def __init__(self, body: AsyncGenerator[bytes, None],
                 end: Callable[[], Awaitable[None]]) -> None:
        self._body = body
        self._end = end

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._body

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            await self._end()


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterable[bytes], status_code: int,
                 headers: Mapping[str, str]) -> None:
        # Starlette's constructor inspects the content and re-reads the headers; these
        # are known: an async iterator of bytes and a few ASCII headers.
        self.body_iterator = content
        self.status_code = status_code
        self.background = None
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-type", b"text/event-stream; charset=utf-8"))
        self.raw_headers = raw
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the stream has ended, however it ends, after the relay's own
        clean-up (the gateway's per-caller stream count)."""
        self._on_close.append(fn)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        hung_up = False

        async def watch() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up = True
            task.cancel()

        watcher: asyncio.Task[None] | None = None

        def first_written() -> None:
            # Started once the first event is out: the task is off the first token's path,
            # and until then the relay is not waiting on anything a hang-up could cut.
            nonlocal watcher
            watcher = asyncio.create_task(watch())

        try:
            await self._stream(send, _socket_of(receive), first_written)
        except asyncio.CancelledError:
            if not hung_up:
                raise  # a shutdown, not ours to swallow
            task.uncancel()
        except OSError:
            pass  # ASGI 2.4 servers raise this from send() once the caller is gone
        finally:
            if watcher is not None:
                watcher.cancel()
            # Interrupted or not, the relay's cleanup (closing the upstream, booking the
            # call) runs now, not whenever the generator is collected; a Relay runs it
            # even when its body never started (the start failed to go out).
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                callbacks, self._on_close = self._on_close, []
                for fn in callbacks:
                    fn()

    async def _stream(self, send: Send, sock: Any, first_written: Callable[[], None]) -> None:
        corked = sock is not None and _set_cork(sock, 1)
        first = True
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                body = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if first:
                    first = False
                    if corked:
                        corked = not _set_cork(sock, 0)
                    first_written()
        finally:
            if corked:
                _set_cork(sock, 0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _socket_of(receive: Receive) -> Any:
    """The caller's socket where the server lets it be found: uvicorn's `receive` is a
    method of the connection's cycle, which holds the transport."""
    if _CORK is None:
        return None
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    get = getattr(transport, "get_extra_info", None)
    return get("socket") if get is not None else None


def _set_cork(sock: Any, on: int) -> bool:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, on)
        return True
    return False
