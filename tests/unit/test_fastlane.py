"""The fast lane (router/http/fastlane.py): middleware added to the app later runs on the
proxied endpoints too, not only on the routes FastAPI serves."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response

from router.app import Settings, create_app
from router.http.fastlane import HOT, FastLaneApp
from tests.unit.helpers import World, config
from tests.unit.test_gateway import CHAT, assert_openai_error

BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"model": "demo", "prompt": "hello"},
    "/v1/embeddings": {"model": "demo", "input": "hello"},
}
# The test config's alias serves no embeddings: the gateway's own refusal is the answer.
STATUS = {"/v1/chat/completions": 200, "/v1/completions": 200, "/v1/embeddings": 400}


def app_with(world: World) -> FastLaneApp:
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=config(),
                     transport=world.transport())
    assert isinstance(app, FastLaneApp)
    return app


@pytest.mark.parametrize("path", sorted(HOT))
async def test_http_middleware_added_later_runs_on_the_proxied_endpoints(path: str) -> None:
    """The lane took these paths before the app's middleware stack: a tracing middleware
    added with @app.middleware saw /v1/models but never a chat completion."""
    world = World()
    app = app_with(world)
    seen: list[str] = []

    @app.middleware("http")
    async def trace(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        seen.append(request.url.path)
        response = await call_next(request)
        response.headers["x-trace"] = "on"
        return response

    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        r = await c.post(path, json=BODIES[path])
        assert r.status_code == STATUS[path], r.text
        assert r.headers["x-trace"] == "on"
        # A refusal from the gateway goes through it too, in the API's error shape.
        r = await c.post(path, json={**BODIES[path], "model": "nope"})
        assert_openai_error(r, 404)
        assert r.headers["x-trace"] == "on"
        r = await c.get("/v1/models")
        assert r.headers["x-trace"] == "on"
    assert seen == [path, path, "/v1/models"]


async def test_cors_and_gzip_apply_to_completions_streamed_or_not() -> None:
    world = World()
    app = app_with(world)
    app.add_middleware(GZipMiddleware, minimum_size=1)
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"],
                       allow_methods=["*"], allow_headers=["*"])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"origin": "https://app.example",
                                  "accept-encoding": "gzip"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["content-type"].startswith("text/event-stream")
        # (GZip leaves event streams alone, by design: a whole answer is compressed.)
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"origin": "https://app.example", "accept-encoding": "gzip"})
        assert r.status_code == 200, r.text
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.json()["choices"]  # httpx decoded it: the whole answer
        # The preflight a browser sends first is answered by the same middleware.
        r = await c.options("/v1/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"


async def test_without_middleware_the_lane_calls_the_gateway_directly() -> None:
    app = app_with(World())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert app._lane == app._proxy


async def test_middleware_added_after_the_first_request_is_refused() -> None:
    """Starlette's own rule, which the lane relies on: both stacks are built from the
    same list at the same moment."""
    app = app_with(World())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        with pytest.raises(RuntimeError, match="after an application has started"):
            app.add_middleware(GZipMiddleware)
