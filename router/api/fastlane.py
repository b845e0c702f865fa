"""The proxied endpoints, taken before FastAPI's exception middleware and routing.

Installed as the outermost user middleware (inside Starlette's ServerErrorMiddleware
only), so chat, completion and embedding requests skip the exception and exit-stack
middleware, the scan of the route table, the route's wrappers, and two wrappers around
each streamed event's send. On the first token's path that measured ~100-250 us on this
machine, where a cold Python frame runs several times slower than in a tight loop. The
routes stay registered with FastAPI (the OpenAPI schema, and any path this lane does not
take) and both ways end in the same `Gateway.handle` and the same error shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from router.api.errors import internal_error
from router.config import Endpoint
from router.errors import SpilloverError, to_response

if TYPE_CHECKING:
    from router.gateway import Gateway

HOT: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class FastLane:
    """ASGI: POSTs to the proxied endpoints go straight to the gateway; all else to `app`."""

    def __init__(self, app: ASGIApp, gateway: Callable[[], Gateway]) -> None:
        self.app = app
        self._gateway = gateway  # read per request: a reload swaps the gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = HOT.get(scope["path"])
            if endpoint is not None and not scope.get("root_path"):
                await self._proxy(endpoint, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _proxy(self, endpoint: Endpoint, scope: Scope, receive: Receive,
                     send: Send) -> None:
        try:
            response = await self._gateway().handle(endpoint, Request(scope, receive))
        except SpilloverError as exc:
            response = to_response(exc)
        except Exception as exc:
            response = internal_error(scope["path"], exc)
        await response(scope, receive, send)
