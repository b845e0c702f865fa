"""POST /v1/messages and /v1/messages/count_tokens through the ASGI app, upstreams faked."""

from __future__ import annotations

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
from tests.unit.helpers import BASE_YAML, World, chunk, config, sse, tool_calling_hosted

KEY = "sk-caller-anthropic"
MSG: dict[str, Any] = {"model": "demo", "max_tokens": 32,
                       "messages": [{"role": "user", "content": "hello"}]}


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
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    ) as c:
        yield c, app.state.runtime


async def rows(rt: Runtime, n: int) -> list[Any]:
    for _ in range(100):
        got = rt.ledger.rows(since=0, until=time.time() + 60)
        if len(got) >= n:
            return list(got)
        await asyncio_sleep()
    return list(rt.ledger.rows(since=0, until=time.time() + 60))


async def asyncio_sleep() -> None:
    import asyncio

    await asyncio.sleep(0.02)


def assert_anthropic_error(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and "sk-test-secret" not in r.text
    return dict(body)


async def test_create_served_locally_as_a_message(app_client: Any, world: World) -> None:
    c, rt = app_client
    r = await c.post("/v1/messages", json={**MSG, "system": "be brief",
                                           "stop_sequences": ["END"]})
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "demo"
    assert msg["content"] == [{"type": "text", "text": "local answer"}]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"] == {"input_tokens": 10, "output_tokens": 5}
    assert r.headers["x-spillover-route"] == "local"
    assert r.headers["request-id"] == r.headers["x-request-id"]
    sent = world.bodies("local")[0]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 32 and sent["stop"] == ["END"]
    (row,) = await rows(rt, 1)
    assert row.endpoint == "messages" and row.caller == "app"
    assert (row.prompt_tokens, row.completion_tokens) == (10, 5)
    metrics = rt.metrics.render().decode()
    assert 'spillover_api_requests_total{api="messages",route="local",status="200"} 1.0' \
        in metrics


async def test_bearer_key_works_too_and_a_missing_key_is_anthropic_401(
        app_client: Any) -> None:
    c, _ = app_client
    r = await c.post("/v1/messages", json=MSG,
                     headers={"x-api-key": "", "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    r = await c.post("/v1/messages", json=MSG, headers={"x-api-key": "wrong"})
    assert_anthropic_error(r, 401, "authentication_error")
    async with httpx.AsyncClient(transport=c._transport, base_url="http://router") as bare:
        r = await bare.post("/v1/messages", json=MSG)
    err = assert_anthropic_error(r, 401, "authentication_error")
    assert "x-api-key" in err["error"]["message"]


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error"),  # max_tokens is required
    ({**MSG, "model": "nope"}, 404, "not_found_error"),
    ({**MSG, "tools": [{"type": "bash_20250124", "name": "bash"}]}, 400,
     "invalid_request_error"),
])
async def test_bad_requests_get_anthropic_errors(app_client: Any, body: dict[str, Any],
                                                 status: int, kind: str) -> None:
    c, _ = app_client
    assert_anthropic_error(await c.post("/v1/messages", json=body), status, kind)


async def test_not_json_is_an_anthropic_error(app_client: Any) -> None:
    c, _ = app_client
    r = await c.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert_anthropic_error(r, 400, "invalid_request_error")


async def test_a_wrong_method_or_path_is_an_anthropic_error(app_client: Any) -> None:
    c, _ = app_client
    assert_anthropic_error(await c.get("/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(await c.get("/v1/messages/count_tokens"), 405,
                           "invalid_request_error")
    assert_anthropic_error(await c.post("/v1/messages/batches/x", json=MSG), 404,
                           "not_found_error")
    # Elsewhere the OpenAI shape stays.
    r = await c.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


async def test_no_capacity_is_529_overloaded(app_client: Any, world: World) -> None:
    """Where an OpenAI client gets 503 (here: the request must stay on-prem and the engine
    is down), an Anthropic client gets 529 overloaded_error."""
    c, _ = app_client
    world.local_up = False
    # The first call finds the engine down (a connect error: 502, api_error); from then on
    # the gateway knows there is nowhere to go.
    first = await c.post("/v1/messages", json=MSG, headers={"x-spillover-residency": "onprem"})
    assert_anthropic_error(first, 502, "api_error")
    r = await c.post("/v1/messages", json=MSG, headers={"x-spillover-residency": "onprem"})
    openai = await c.post("/v1/chat/completions", json=MSG,
                          headers={"x-spillover-residency": "onprem",
                                   "authorization": f"Bearer {KEY}"})
    assert openai.status_code == 503, openai.text
    assert_anthropic_error(r, 529, "overloaded_error")
    assert r.headers["x-spillover-reason"] == openai.headers["x-spillover-reason"]


async def test_forced_hosted_tool_round_trip_maps_ids_both_ways(app_client: Any,
                                                                world: World) -> None:
    c, rt = app_client
    answered: list[str] = []
    world.hosted = tool_calling_hosted(answered)
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    first = await c.post("/v1/messages", json={**MSG, "tools": tools,
                                               "tool_choice": {"type": "any"}},
                         headers={"x-spillover-route": "hosted"})
    assert first.status_code == 200, first.text
    assert first.headers["x-spillover-route"] == "hosted"
    m1 = first.json()
    assert m1["stop_reason"] == "tool_use"
    use = m1["content"][0]
    assert use["type"] == "tool_use" and use["input"] == {"city": "Oslo"}
    assert world.bodies("hosted")[0]["tool_choice"] == "any"
    # Second turn with a caller-side id of Anthropic's spelling (as a conversation that
    # began elsewhere would carry): La Plateforme sees 9 characters, the caller its own.
    history = [*MSG["messages"],
               {"role": "assistant", "content": [{**use, "id": "toolu_01LongAnthropicId"}]},
               {"role": "user", "content": [{"type": "tool_result",
                                             "tool_use_id": "toolu_01LongAnthropicId",
                                             "content": "sunny"}]}]
    second = await c.post("/v1/messages", json={**MSG, "messages": history, "tools": tools},
                          headers={"x-spillover-route": "hosted"})
    assert second.status_code == 200, second.text
    assert len(answered[0]) == 9 and answered[0].isalnum()
    sent = world.bodies("hosted")[1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == answered[0]
    assert second.json()["content"][0]["id"] == "toolu_01LongAnthropicId"
    got = await rows(rt, 2)
    assert [r.route for r in got] == ["hosted", "hosted"]
    assert all(r.endpoint == "messages" for r in got)
    assert got[0].cost_usd == pytest.approx(100 * 0.1e-6 + 20 * 0.3e-6)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for raw in text.split("\n\n"):
        if raw.strip():
            name, data = raw.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_stream_events_and_the_ledger_row(app_client: Any, world: World) -> None:
    c, rt = app_client

    def local(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=sse([chunk("demo", ""), chunk("demo", "Hi"),
                                           chunk("demo", " there", finish="stop"),
                                           chunk("demo", usage=(9, 2))]))

    world.local = local
    r = await c.post("/v1/messages", json={**MSG, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [n for n, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta")
    assert text == "Hi there"
    assert events[6][1]["usage"] == {"input_tokens": 9, "output_tokens": 2}
    (row,) = await rows(rt, 1)
    assert row.endpoint == "messages"
    assert (row.prompt_tokens, row.completion_tokens) == (9, 2)


async def test_stream_broken_midway_ends_with_an_error_event(app_client: Any,
                                                              world: World) -> None:
    c, rt = app_client

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'data: ' + json.dumps(chunk("demo", "Hel")).encode() + b"\n\n"
            raise httpx.ReadError("connection reset")

    world.local = lambda req: httpx.Response(200, stream=Broken(),
                                             headers={"content-type": "text/event-stream"})
    r = await c.post("/v1/messages", json={**MSG, "stream": True})
    events = sse_events(r.text)
    assert [n for n, _ in events][-1] == "error"
    assert "message_stop" not in [n for n, _ in events]
    assert events[-1][1]["error"]["type"] == "api_error"
    (row,) = await rows(rt, 1)
    assert row.endpoint == "messages" and row.status == 502


async def test_count_tokens_asks_the_engine_then_estimates(app_client: Any,
                                                           world: World) -> None:
    c, _ = app_client

    def local(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/tokenize"
        body = json.loads(req.content)
        assert body["messages"][0] == {"role": "system", "content": "sys"}
        return httpx.Response(200, json={"count": 17, "max_model_len": 2048, "tokens": []})

    world.local = local
    body = {"model": "demo", "system": "sys", "messages": [{"role": "user", "content": "hi"}]}
    r = await c.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"input_tokens": 17}
    assert r.headers["x-spillover-token-count"] == "engine"
    world.local_up = False
    r = await c.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200 and r.headers["x-spillover-token-count"] == "estimate"
    assert r.json()["input_tokens"] >= 1
    assert not world.bodies("hosted")  # counting never leaves the building
    assert_anthropic_error(await c.post("/v1/messages/count_tokens",
                                        json={**body, "model": "nope"}),
                           404, "not_found_error")
