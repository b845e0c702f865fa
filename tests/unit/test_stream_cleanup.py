"""A relayed stream's clean-up runs however the stream ends, even when its body never
started: the response could not be built (a header that is not latin-1), or the ASGI
server's `send` raised on a connection the caller had already closed. Afterwards the
engine is not counted in flight, no budget hold is left, the upstream response is closed
(its connection goes back or away) and the call has its ledger row."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from router.config import ConfigError
from router.runtime import Runtime
from tests.unit.helpers import (
    BASE_YAML,
    World,
    call_then_leave,
    chunk,
    config,
    gateway_app,
    lifespan_client,
)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "stream": True}
EVENTS = 50


class TrackedStream(httpx.AsyncByteStream):
    """An upstream body that records being closed (what frees its connection)."""

    def __init__(self, closed: list[bool]) -> None:
        self._closed = closed
        self._closed.append(False)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(EVENTS):
            yield b"data: " + json.dumps(chunk("m", f"t{i}")).encode() + b"\n\n"
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self._closed[-1] = True


def streaming_world(closed: list[bool]) -> World:
    world = World()

    def answer(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=TrackedStream(closed))

    world.local = answer
    world.hosted = answer
    return world


async def ledger_rows(runtime: Runtime, n: int) -> list[Any]:
    rows: list[Any] = []
    for _ in range(100):  # rows of cut-off streams are written without waiting
        rows = runtime.ledger.rows(since=0, until=time.time() + 60)
        if len(rows) >= n:
            break
        await asyncio.sleep(0.02)
    return rows


def assert_cleaned_up(runtime: Runtime, closed: list[bool]) -> None:
    assert all(e["inflight"] == 0 for e in runtime.monitor.status().values())
    budgets = runtime.budgets.snapshot()
    assert isinstance(budgets, dict)
    reserved = [p["reserved"] for p in budgets["global"].values()]
    assert reserved and all(r == 0 for r in reserved), budgets
    assert closed == [True]


def test_a_provider_name_headers_cannot_carry_is_refused_by_the_config() -> None:
    # x-spillover-backend carries the provider's name, and HTTP/1.1 headers are latin-1.
    yaml_text = BASE_YAML.replace("  mistral: {kind", "  mistral-€: {kind").replace(
        "- provider: mistral", "- provider: mistral-€")
    with pytest.raises(ConfigError, match="not a valid provider name"):
        config(yaml_text)


async def test_a_response_that_cannot_be_built_still_ends_its_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Building the stream's response fails after the upstream stream was opened (as it did
    # for a provider name outside latin-1 before the config refused those).
    def unbuildable(*args: Any, **kwargs: Any) -> None:
        raise UnicodeEncodeError("latin-1", "mistral-€", 8, 9, "ordinal not in range(256)")

    monkeypatch.setattr("router.routing.dispatch.EventStream", unbuildable)
    closed: list[bool] = []
    world = streaming_world(closed)
    world.local_up = False
    app = gateway_app(world)
    runtime: Runtime = app.state.runtime
    async with lifespan_client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert world.bodies("hosted"), "the hosted stream was opened"
        assert_cleaned_up(runtime, closed)
        rows = await ledger_rows(runtime, 1)
        assert [(row.route, row.backend, row.status) for row in rows] == [
            ("hosted", "mistral", 500)]


@pytest.mark.parametrize("route", ["local", "hosted"])
async def test_a_start_that_cannot_be_sent_still_ends_its_stream(route: str) -> None:
    """An ASGI server whose send() raises once the caller is gone: the stream's start
    never goes out, so its body never starts."""
    closed: list[bool] = []
    world = streaming_world(closed)
    app = gateway_app(world)
    runtime: Runtime = app.state.runtime
    body = json.dumps(CHAT).encode()
    async with app.router.lifespan_context(app):
        # Gone before the start could be sent: the first send raises.
        sent = await call_then_leave(app, "/v1/chat/completions", body, after=1,
                                     headers=((b"x-spillover-route", route.encode()),),
                                     app_may_raise=False)
        assert [m["type"] for m in sent] == ["http.response.start"]
        assert sent[0]["status"] == 200
        assert world.bodies(route), "the upstream stream was opened"
        assert_cleaned_up(runtime, closed)
        rows = await ledger_rows(runtime, 1)
        assert [(row.route, row.status) for row in rows] == [(route, 499)]
        # and the caller's stream slot is free again
        assert runtime.gateway.streams.open("anonymous") == 0
