"""The app: FastAPI, with the proxied endpoints taken before any of its layers.

Chat, completion and embedding requests would otherwise pass through FastAPI's and
Starlette's entry points, three middleware, a scan of the route table and the route's
wrappers, and each streamed event through two wrappers around `send`. On this machine a
process woken from idle runs its first Python several times slower than in a tight loop
(measured: 4-10x), so every layer on the first token's path counts. The routes stay
registered with FastAPI (the OpenAPI schema, and any request this lane does not take)
and both ways end in the same `Gateway.handle` and the same error shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from router.config import Endpoint
from router.errors import SpilloverError, to_response
from router.http.errors import internal_error

if TYPE_CHECKING:
    from router.routing.gateway import Gateway

HOT: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class GatewayAPI(FastAPI):
    def __init__(self, *, gateway: Callable[[], Gateway], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gateway = gateway  # read per request: a reload swaps the gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = HOT.get(scope["path"])
            # Under a root_path (mounted behind a prefix) FastAPI's routing has the say.
            if endpoint is not None and not scope.get("root_path"):
                await self._proxy(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _proxy(self, endpoint: Endpoint, scope: Scope, receive: Receive,
                     send: Send) -> None:
        try:
            response = await self._gateway().handle(endpoint, scope, receive)
        except SpilloverError as exc:
            response = to_response(exc)
        except Exception as exc:
            response = internal_error(scope["path"], exc)
        await response(scope, receive, send)
