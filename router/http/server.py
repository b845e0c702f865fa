"""The HTTP server spillover runs: uvicorn with its httptools protocol, bounded before a
request exists.

uvicorn's httptools protocol puts no limit on a request head: httptools joins the pieces
of a header that llhttp hands over, so one connection sending an endless header grows the
router's memory (and the joining its CPU) without end, and a connection that sends part of
a head, or nothing, is never closed. The subclass here counts
the bytes of each request head and times it:

- more than `max_header_bytes` before the head is complete: 431, then the connection closes;
- a head begun and not finished within `header_timeout_s` (a new connection's first head
  counts from the moment it connects): 408, or a plain close if nothing was sent;
- between requests, uvicorn's own keep-alive timer (`keep_alive_s`) closes idle connections.

A head that arrives whole in one read (every ordinary request) costs a few attribute
updates and no timer; a timer runs only while a head is incomplete, and from a new
connection's start to its first head.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from router.config import Server
from router.errors import InvalidRequest

# After a refusal the peer may still be sending (it meant to send all of its head): its
# bytes are read and dropped for this long, so the refusal is not lost to a reset (closing
# a socket with unread input sends RST, which can discard the answer before it is read).
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int = 64 * 1024
    timeout_s: float = 10.0


class _Refused(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time limit on each request head."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the current request head read so far; None from the end of the head to
        # the end of the message (body bytes are the app's to bound).
        self._head_bytes: int | None = 0
        self._read_size = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._read_size = len(data)
        seen = self._head_bytes
        if seen is None:  # inside a body: uvicorn's own path
            super().data_received(data)
            return
        if self._refused:
            return  # lingering after a refusal: read and drop
        self._head_bytes = seen + len(data)
        # uvicorn's data_received, except that a head refused by on_headers_complete (which
        # raises to stop the parser) is not reported as a malformed request.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._refused:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # Still inside a head after this read (a complete head sets None, the end of its
        # message 0): the head is incomplete.
        seen = self._head_bytes
        if seen and not self.transport.is_closing():
            if seen > self.limits.max_bytes:
                self._refuse_oversized()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.timeout_s,
                                                        self._head_timed_out)

    def on_headers_complete(self) -> None:
        seen = self._head_bytes or 0
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        limit = self.limits.max_bytes
        # Measured only when this read, or the reads of this head, are larger than a head
        # may be: a head can arrive whole with its body in one read.
        if (seen > limit or self._read_size > limit) and self._head_size() > limit:
            self._refuse_oversized()
            raise _Refused  # stops the parser: nothing of this request reaches the app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0
        super().on_message_complete()

    def _head_size(self) -> int:
        """The request line and headers as parsed (whitespace around values aside)."""
        return (len(self.url) + 16 + 2
                + sum(len(name) + len(value) + 4 for name, value in self.headers))

    def _refuse_oversized(self) -> None:
        self._refuse(431, f"the request line and headers exceed {self.limits.max_bytes} "
                     "bytes", "request_header_fields_too_large")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._head_bytes is None:
            return
        if self._responding():
            # The next head was begun while this response is still going out (pipelining):
            # its time counts once the response is done.
            self._head_timer = self.loop.call_later(self.limits.timeout_s,
                                                    self._head_timed_out)
            return
        if self._head_bytes:
            self._refuse(408, f"the request line and headers did not arrive within "
                         f"{self.limits.timeout_s:g} s", "request_timeout")
        else:
            self.transport.close()  # connected and sent nothing

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refused = True
        self._stop_head_timer()
        if self._responding():
            # An answer to an earlier request is on the wire; a second one cannot interleave.
            self.transport.close()
            return
        body = orjson.dumps(InvalidRequest(message, code=code).body())
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend([b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # The peer's own close (eof_received) usually ends it sooner.
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_protocol(limits: HeadLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class with these limits (uvicorn builds it from the class alone)."""

    class Bounded(BoundedHttpToolsProtocol):
        pass

    Bounded.limits = limits
    return Bounded


def server_config(app: Any, server: Server, *, host: str, port: int,
                  log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration `spillover serve` runs (tests serve through it too)."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=10,
        http=bounded_protocol(HeadLimits(server.max_header_bytes, server.header_timeout_s)),
        timeout_keep_alive=server.keep_alive_s,
        # Nothing reads the caller's address, so rewriting it from X-Forwarded-For would
        # be one more layer on every request for nothing; no Server header names uvicorn.
        proxy_headers=False, server_header=False,
    )
