from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.accounting.usage import query as usage_query
from router.accounting.usage import report as usage_report
from router.accounting.usage import to_csv, totals
from router.config import ConfigError
from router.errors import Forbidden, InvalidRequest
from router.http.inbound import read_json
from router.http.messages import count_tokens, messages
from router.http.responses import responses
from router.http.schemas import (
    CHAT_BODY,
    COMPLETIONS_BODY,
    COUNT_TOKENS_BODY,
    EMBEDDINGS_BODY,
    ERROR_RESPONSES,
    EXPLAIN_BODY,
    MESSAGES_BODY,
    RESPONSES_BODY,
)
from router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.routing.gateway import header_map
from router.routing.tracing import traced_count

# Spend, callers and usage: no browser or proxy cache keeps a copy.
NO_STORE = {"cache-control": "no-store"}

if TYPE_CHECKING:
    from router.runtime import Runtime

class RequestOnlyRoute(APIRoute):
    """For endpoints that take the Request and return a Response: FastAPI's handler
    (dependency solving, parameter validation, response serialisation) has nothing to do
    there and costs time on every request (docs/performance.md); the route still documents
    itself in OpenAPI."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


def build_routes(rt: Runtime) -> APIRouter:
    r = APIRouter()
    hot = APIRouter(route_class=RequestOnlyRoute)

    @hot.post("/v1/chat/completions", openapi_extra=CHAT_BODY)
    async def chat(request: Request) -> Response:
        return await rt.parts.gateway.handle("chat", request.scope, request.receive)

    @hot.post("/v1/completions", openapi_extra=COMPLETIONS_BODY)
    async def completions(request: Request) -> Response:
        return await rt.parts.gateway.handle("completions", request.scope, request.receive)

    @hot.post("/v1/embeddings", openapi_extra=EMBEDDINGS_BODY)
    async def embeddings(request: Request) -> Response:
        return await rt.parts.gateway.handle("embeddings", request.scope, request.receive)

    # Anthropic's Messages API: its own error shape, so errors never reach the OpenAI
    # handlers (router.http.messages renders every one); the schema says so per route.
    @hot.post("/v1/messages", openapi_extra=MESSAGES_BODY)
    async def anthropic_messages(request: Request) -> Response:
        return await messages(rt.parts.gateway, request.scope, request.receive)

    @hot.post("/v1/messages/count_tokens", openapi_extra=COUNT_TOKENS_BODY)
    async def anthropic_count_tokens(request: Request) -> Response:
        gateway = rt.parts.gateway
        if gateway.tracing is not None:  # a span of its own, /tokenize its child
            return await traced_count(gateway.tracing, header_map(request.scope["headers"]),
                                      lambda: count_tokens(gateway, request.scope,
                                                           request.receive))
        return await count_tokens(gateway, request.scope, request.receive)

    # OpenAI's Responses API (stateless): OpenAI's error shape, the usual handlers.
    @hot.post("/v1/responses", openapi_extra=RESPONSES_BODY)
    async def openai_responses(request: Request) -> Response:
        return await responses(rt.parts.gateway, request.scope, request.receive)

    r.include_router(hot)

    @r.post("/v1/route/explain", openapi_extra=EXPLAIN_BODY)
    async def explain(request: Request) -> dict[str, Any]:
        """Where a chat completion would go now, and why; calls no upstream."""
        # The same header reading as the routed endpoints (repeated policy headers too).
        parts = rt.parts  # once: a reload during the body read must not mix two configs
        headers = header_map(request.scope["headers"])
        principal = parts.auth.caller(headers)
        body = await read_json(request.receive, parts.config.server.max_body_bytes, headers)
        return parts.gateway.explain(principal, "chat", body, headers)

    @r.get("/v1/models", openapi_extra={"responses": ERROR_RESPONSES})
    async def models(request: Request) -> dict[str, Any]:
        parts = rt.parts
        allowed = parts.auth.caller(request.headers).policy.aliases
        return {
            "object": "list",
            "data": [
                {"id": alias, "object": "model", "created": 0, "owned_by": "spillover"}
                for alias in parts.catalog.listed() if allowed is None or alias in allowed
            ],
        }

    @r.get("/v1/usage", openapi_extra={"responses": ERROR_RESPONSES})
    async def usage(request: Request, since: str | None = None, until: str | None = None,
                    group_by: str | None = None, caller: str | None = None,
                    format: str = "json") -> Response:
        """Usage from the ledger: a caller sees its own, the admin everyone's."""
        who = rt.parts.auth.viewer(request.headers)
        if not who.admin:
            if caller is not None and caller != who.name:
                raise Forbidden("a caller sees only its own usage", param="caller",
                                code="admin_only")
            caller = who.name
        if format not in ("json", "csv"):
            raise InvalidRequest("'format' must be json or csv", param="format")
        q = usage_query(since, until, group_by, caller)
        rows = await asyncio.to_thread(usage_report, rt.ledger, q)
        if format == "csv":
            return Response(to_csv(rows, q.group_by), media_type="text/csv",
                            headers={"content-disposition": "attachment; filename=usage.csv",
                                     **NO_STORE})
        return JSONResponse({"object": "usage", "since": q.since, "until": q.until,
                             "group_by": list(q.group_by), "caller": q.caller,
                             "data": rows, "total": totals(rows)}, headers=NO_STORE)

    @r.post("/admin/reload")
    async def reload(request: Request, allow_open: bool = False) -> dict[str, Any]:
        """Re-read models.yaml; a file that does not validate changes nothing, nor one that
        would remove every caller or the admin key unless `allow_open=true`."""
        rt.parts.auth.admin(request.headers)
        try:
            cfg = await rt.reload(allow_open=allow_open)
        except ConfigError as exc:
            raise InvalidRequest(
                f"{exc.path} does not validate; the running config stays: "
                + "; ".join(str(p) for p in exc.problems), code="invalid_config") from None
        return {"reloaded": True, "aliases": sorted(cfg.aliases),
                "callers": sorted(cfg.callers)}

    @r.get("/status")
    async def status(request: Request, response: Response) -> dict[str, object]:
        rt.parts.auth.admin(request.headers)
        response.headers.update(NO_STORE)
        return rt.status()

    @r.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # It names callers with their spend: the admin key or a metrics token, unless the
        # operator made it public (server.metrics_public).
        parts = rt.parts
        parts.auth.metrics(request.headers, parts.config.server.metrics_public)
        return Response(rt.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @r.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Open for probes: ready or not. The details (aliases, model ids, engine and host
        load) only with the admin key."""
        ready, detail = rt.readiness()
        body = detail if rt.parts.auth.is_admin(request.headers) else {"ready": ready}
        return JSONResponse(body, status_code=200 if ready else 503)

    return r
