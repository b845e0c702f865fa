from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from router.app import Runtime

# Documented in the OpenAPI schema without being parsed by FastAPI: the gateway reads
# the raw body once itself (see router/inbound.py).
_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def build_routes(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions", openapi_extra=_JSON_BODY)
    async def chat(request: Request) -> Response:
        return await rt.gateway.handle("chat", request)

    @r.post("/v1/completions", openapi_extra=_JSON_BODY)
    async def completions(request: Request) -> Response:
        return await rt.gateway.handle("completions", request)

    @r.post("/v1/embeddings", openapi_extra=_JSON_BODY)
    async def embeddings(request: Request) -> Response:
        return await rt.gateway.handle("embeddings", request)

    @r.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": alias, "object": "model", "created": 0, "owned_by": "spillover"}
                for alias in rt.catalog.aliases
            ],
        }

    @r.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz")
    async def readyz() -> Response:
        ready, detail = rt.readiness()
        return JSONResponse(detail, status_code=200 if ready else 503)

    return r
