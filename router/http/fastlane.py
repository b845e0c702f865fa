"""The app: FastAPI, with the proxied endpoints taken before any of its layers.

Chat, completion and embedding requests would otherwise pass through FastAPI's and
Starlette's entry points, three middleware, a scan of the route table and the route's
wrappers, and each streamed event through two wrappers around `send`. On this machine a
process woken from idle runs its first Python several times slower than in a tight loop
(docs/performance.md), so every layer on the first token's path counts. The routes stay
registered with FastAPI (the OpenAPI schema, and any request this lane does not take)
and both ways end in the same `Gateway.handle` and the same error shapes.

Middleware given to the app (`add_middleware`, `@app.middleware("http")`: CORS, tracing,
gzip) runs on the lane too, in the same order: the lane skips FastAPI's and Starlette's
own layers only, not the operator's. With none added the lane calls the gateway directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

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


class FastLaneApp(FastAPI):
    """FastAPI, with the proxied endpoints (`HOT`) served by a lane around its layers."""

    def __init__(self, *, gateway: Callable[[], Gateway], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gateway = gateway  # read per request: a reload swaps the gateway
        self._lane: ASGIApp = self._proxy  # the user middleware around it, once built

    def build_middleware_stack(self) -> ASGIApp:
        # Starlette builds its stack once, on the first request, and refuses middleware
        # added after that: the lane is built at the same moment from the same list, so
        # the two cannot disagree.
        lane: ASGIApp = self._proxy
        for cls, args, kwargs in reversed(self.user_middleware):
            lane = cls(lane, *args, **kwargs)
        self._lane = lane
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Under a root_path (mounted behind a prefix) FastAPI's routing has the say.
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in HOT \
                and not scope.get("root_path"):
            if self.middleware_stack is None:
                self.middleware_stack = self.build_middleware_stack()
            scope["app"] = self  # as Starlette sets it, for middleware that reads it
            await self._lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint: Endpoint = HOT[scope["path"]]
        try:
            response = await self._gateway().handle(endpoint, scope, receive)
        except SpilloverError as exc:
            response = to_response(exc)
        except Exception as exc:
            response = internal_error(scope["path"], exc)
        await response(scope, receive, send)
