"""POST /v1/responses through the ASGI app, upstreams faked."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml

from router.app import Settings, create_app
from router.routing.auth import key_digest
from router.runtime import Runtime
from tests.unit.helpers import (
    BASE_YAML,
    World,
    assert_openai_error,
    chunk,
    config,
    sse,
    tool_calling_hosted,
)

KEY = "sk-caller-responses"
REQ: dict[str, Any] = {"model": "demo", "input": "hello", "max_output_tokens": 32}


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
async def app_client(world: World) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    data = yaml.safe_load(BASE_YAML)
    data["callers"] = {"app": {"key_sha256": [key_digest(KEY)], "may_force_route": True}}
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}),
                     config=config(yaml.safe_dump(data)), transport=world.transport())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router",
        headers={"authorization": f"Bearer {KEY}"},
    ) as c:
        yield c, app.state.runtime


async def rows(rt: Runtime, n: int) -> list[Any]:
    for _ in range(100):
        got = rt.ledger.rows(since=0, until=time.time() + 60)
        if len(got) >= n:
            return list(got)
        await asyncio.sleep(0.02)
    return list(rt.ledger.rows(since=0, until=time.time() + 60))


def sse_events(text: str) -> list[dict[str, Any]]:
    out = []
    for raw in text.split("\n\n"):
        if raw.strip():
            name, data = raw.split("\n")
            ev = json.loads(data.removeprefix("data: "))
            assert name == "event: " + ev["type"]
            out.append(ev)
    return out


async def test_create_served_locally_as_a_response(app_client: Any, world: World) -> None:
    c, rt = app_client
    r = await c.post("/v1/responses", json={**REQ, "instructions": "be brief",
                                            "store": True, "metadata": {"team": "a"}})
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["object"] == "response" and resp["status"] == "completed"
    assert resp["model"] == "demo" and resp["id"].startswith("resp_")
    assert resp["output"][0]["type"] == "message"
    assert resp["output"][0]["content"][0]["text"] == "local answer"
    assert resp["usage"]["input_tokens"] == 10 and resp["usage"]["output_tokens"] == 5
    assert resp["usage"]["total_tokens"] == 15
    assert resp["store"] is False and resp["metadata"] == {"team": "a"}
    assert r.headers["x-spillover-route"] == "local"
    assert int(r.headers["content-length"]) == len(r.content)
    sent = world.bodies("local")[0]
    assert sent["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello"}]
    assert sent["max_tokens"] == 32 and "store" not in sent and "input" not in sent
    (row,) = await rows(rt, 1)
    assert row.endpoint == "responses" and row.caller == "app"
    assert (row.prompt_tokens, row.completion_tokens) == (10, 5)
    metrics = rt.metrics.render().decode()
    assert 'spillover_api_requests_total{api="responses",route="local",status="200"} 1.0' \
        in metrics


@pytest.mark.parametrize(("body", "status", "param"), [
    ({**REQ, "previous_response_id": "resp_abc"}, 400, "previous_response_id"),
    ({**REQ, "tools": [{"type": "web_search_preview"}]}, 400, "tools[0]"),
    ({**REQ, "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, 400, "tools[0]"),
    ({"model": "demo"}, 400, "input"),
    ({**REQ, "model": "nope"}, 404, "model"),
])
async def test_refusals_are_openai_errors_that_say_why(app_client: Any, world: World,
                                                       body: dict[str, Any], status: int,
                                                       param: str) -> None:
    c, _ = app_client
    r = await c.post("/v1/responses", json=body)
    assert_openai_error(r, status)
    assert r.json()["error"]["param"] == param
    assert not world.bodies("local") and not world.bodies("hosted")
    if param == "previous_response_id":
        assert "stateless" in r.json()["error"]["message"]
    if param == "tools[0]":
        assert "built-in tools" in r.json()["error"]["message"]


async def test_auth_and_bad_json_keep_openai_shape(app_client: Any) -> None:
    c, _ = app_client
    assert_openai_error(await c.post("/v1/responses", json=REQ,
                                     headers={"authorization": "Bearer wrong"}), 401)
    r = await c.post("/v1/responses", content=b"{", headers={"content-type":
                                                             "application/json"})
    assert_openai_error(r, 400)


async def test_forced_hosted_function_call_round_trip(app_client: Any, world: World) -> None:
    """A conversation that began locally (long call ids) continues on La Plateforme: it
    sees 9-character ids, the caller its own; the ledger prices the hosted usage."""
    c, rt = app_client
    answered: list[str] = []
    world.hosted = tool_calling_hosted(answered)
    tools = [{"type": "function", "name": "get_weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"type": "function_call", "call_id": "call_0123456789abcdef",
                "name": "get_weather", "arguments": '{"city": "Oslo"}'},
               {"type": "function_call_output", "call_id": "call_0123456789abcdef",
                "output": "sunny"}]
    r = await c.post("/v1/responses", json={**REQ, "input": history, "tools": tools,
                                            "tool_choice": "required"},
                     headers={"x-spillover-route": "hosted"})
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == "hosted"
    out = r.json()["output"]
    assert out[0]["type"] == "function_call"
    assert out[0]["call_id"] == "call_0123456789abcdef"
    assert json.loads(out[0]["arguments"]) == {"city": "Oslo"}
    sent = world.bodies("hosted")[0]
    assert sent["tool_choice"] == "any"
    assert len(answered[0]) == 9 and answered[0].isalnum()
    assert sent["messages"][1]["tool_calls"][0]["id"] == answered[0]
    (row,) = await rows(rt, 1)
    assert row.route == "hosted" and row.endpoint == "responses"
    assert row.cost_usd == pytest.approx(100 * 0.1e-6 + 20 * 0.3e-6)


async def test_json_schema_format_reaches_the_engine(app_client: Any, world: World) -> None:
    c, _ = app_client
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = await c.post("/v1/responses", json={**REQ, "text": {"format": {
        "type": "json_schema", "name": "out", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert world.bodies("local")[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                               "strict": True}}
    assert r.json()["text"]["format"]["type"] == "json_schema"


async def test_stream_events_and_the_ledger_row(app_client: Any, world: World) -> None:
    c, rt = app_client

    def local(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=sse([chunk("demo", ""), chunk("demo", "Hi"),
                                           chunk("demo", " there", finish="stop"),
                                           chunk("demo", usage=(9, 2))]))

    world.local = local
    r = await c.post("/v1/responses", json={**REQ, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") \
        == "Hi there"
    assert "[DONE]" not in r.text
    usage = events[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (9, 2)
    (row,) = await rows(rt, 1)
    assert row.endpoint == "responses" and row.status == 200
    assert (row.prompt_tokens, row.completion_tokens) == (9, 2)


async def test_stream_broken_midway_ends_failed(app_client: Any, world: World) -> None:
    c, rt = app_client

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: " + json.dumps(chunk("demo", "Hel")).encode() + b"\n\n"
            raise httpx.ReadError("connection reset")

    world.local = lambda req: httpx.Response(200, stream=Broken(),
                                             headers={"content-type": "text/event-stream"})
    r = await c.post("/v1/responses", json={**REQ, "stream": True})
    events = sse_events(r.text)
    types = [e["type"] for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert "response.completed" not in types
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    (row,) = await rows(rt, 1)
    assert row.endpoint == "responses" and row.status == 502
