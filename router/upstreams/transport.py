"""The HTTP client of the hot path: one POST to an upstream, its answer whole or streamed.

One small interface, three implementations. `router.upstreams.h1.H1Upstream` speaks to the
plain-HTTP upstreams (the local engines, on every local token's path) and hands TLS ones (the hosted
APIs) to `AiohttpUpstream`, whose connection pool hands out a kept-alive connection in
constant time and whose response parser is C, where httpx's pool scans every pooled
connection on each request (the cost of each per request: docs/performance.md).
`HttpxUpstream` serves an injected httpx transport (tests, embedders) and the probes keep
using httpx. All raise `TransportError` for anything that is not an HTTP answer, so
dispatch knows one error type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx

from router.config import Timeouts


class TransportError(Exception):
    """No HTTP answer: the connection failed, timed out, or broke off mid-body."""

    def __init__(self, kind: str, *, connect: bool = False, timeout: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind  # the underlying error's class name: safe to log and to show
        self.connect = connect
        self.timeout = timeout


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]  # case-insensitive

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Release the connection; before the body's end this closes it, which is what
        tells a vLLM engine to stop generating."""


class Upstream(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, remaining_s: float) -> UpstreamResponse:
        """Send; return once the status line and headers are in (the body unread).
        Every phase is bounded by its own timeout and by the request's remaining time."""
        ...


def _bounded(value: float, remaining_s: float) -> float:
    return max(0.001, min(value, remaining_s))


class AiohttpUpstream:
    def __init__(self, *, max_connections: int, keepalive_s: float = 30.0) -> None:
        self._max = max_connections
        self._keepalive = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Created here, not in __init__: aiohttp binds the session to the running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max, limit_per_host=0,
                                             keepalive_timeout=self._keepalive)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=120.0),
                trust_env=False,  # a proxy set for the shell must not capture loopback engines
                skip_auto_headers=("User-Agent",),
            )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, remaining_s: float) -> UpstreamResponse:
        if self._session is None:
            raise TransportError("ClientNotStarted", connect=True)
        timeout = aiohttp.ClientTimeout(
            total=max(0.001, remaining_s),
            # aiohttp's connect covers the wait for a pooled connection too.
            connect=_bounded(timeouts.pool + timeouts.connect, remaining_s),
            sock_connect=_bounded(timeouts.connect, remaining_s),
            sock_read=_bounded(timeouts.read, remaining_s),
        )
        try:
            resp = await self._session.post(url, data=content, headers=headers,
                                            timeout=timeout, allow_redirects=False)
        except BaseException as exc:
            raise _aiohttp_error(exc) from None
        return _AiohttpResponse(resp)


class _AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except BaseException as exc:
            raise _aiohttp_error(exc) from None
        finally:
            self._resp.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        it = self._resp.content.iter_any()
        while True:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                return
            except BaseException as exc:
                raise _aiohttp_error(exc) from None
            yield chunk
            # aiohttp hands out buffered data without suspending, so a fast upstream would
            # keep this task running: other requests would wait, and a cancellation (the
            # caller hung up) is never delivered while a read is always ready (anyio skips
            # tasks whose awaited future is already done). One yield per chunk prevents both.
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # the whole body was read: the connection goes back
        else:
            self._resp.close()


def _aiohttp_error(exc: BaseException) -> BaseException:
    """TransportError for what the network did; anything else (cancellation) as it is."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransportError(type(exc).__name__, connect=True, timeout=True)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return TransportError(type(exc).__name__, timeout=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportError(type(exc).__name__, connect=True)
    if isinstance(exc, aiohttp.ClientError):
        return TransportError(type(exc).__name__)
    return exc


class HttpxUpstream:
    """Over an httpx client (the one tests give a MockTransport)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None  # the client belongs to whoever made it

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts, remaining_s: float) -> UpstreamResponse:
        timeout = httpx.Timeout(
            connect=_bounded(timeouts.connect, remaining_s),
            read=_bounded(timeouts.read, remaining_s),
            write=_bounded(timeouts.write, remaining_s),
            pool=_bounded(timeouts.pool, remaining_s),
        )
        req = self._client.build_request("POST", url, content=content, headers=headers,
                                         timeout=timeout)
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from None
        return _HttpxResponse(resp)


class _HttpxResponse:
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from None
        finally:
            await self._resp.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        it = self._resp.aiter_bytes()
        while True:
            try:
                chunk = await anext(it)
            except StopAsyncIteration:
                return
            except httpx.HTTPError as exc:
                raise _httpx_error(exc) from None
            yield chunk

    async def aclose(self) -> None:
        await self._resp.aclose()


def _httpx_error(exc: httpx.HTTPError) -> TransportError:
    connect = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
    return TransportError(type(exc).__name__, connect=connect,
                          timeout=isinstance(exc, httpx.TimeoutException))
