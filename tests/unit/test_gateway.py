"""The gateway through ASGI, upstreams faked with MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.unit.helpers import (
    CHAT,
    HOSTED,
    World,
    assert_openai_error,
    chunk,
    completion,
    gateway_app,
    lifespan_client,
    sse,
)


async def test_idle_engine_serves_locally(client: httpx.AsyncClient, world: World) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT,
                          headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "local answer"
    assert r.headers["x-spillover-route"] == "local"
    assert r.headers["x-spillover-backend"] == "demo-local"
    assert r.headers["x-spillover-reason"] == "local-ok"
    assert r.headers["x-request-id"] == "req-42"
    assert world.bodies("local")[0]["model"] == "demo"


async def test_engine_down_goes_hosted_with_cost(client: httpx.AsyncClient,
                                                 world: World) -> None:
    world.local_up = False
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["x-spillover-route"] == "hosted"
    assert r.headers["x-spillover-backend"] == "mistral"
    assert r.headers["x-spillover-reason"] == "local-down"
    # 1000 in x $0.1/M + 2000 out x $0.3/M
    assert float(r.headers["x-spillover-cost-usd"]) == pytest.approx(0.0007)
    sent = world.bodies("hosted")[0]
    assert sent["model"] == "mistral-small-latest"
    assert len(r.headers["x-request-id"]) == 32


async def test_saturated_engine_spills_and_comes_back(world: World) -> None:
    world.waiting = 3  # over max_waiting 0 at the first scrape
    async with lifespan_client(gateway_app(world)) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.headers["x-spillover-route"] == "hosted"
        assert r.headers["x-spillover-reason"] == "local-saturated"
        status = (await c.get("/readyz")).json()["engines"]["demo-local"]
        assert status["saturated"] is True and status["waiting"] == 3


async def test_failover_before_first_byte_on_local_5xx(client: httpx.AsyncClient,
                                                       world: World) -> None:
    world.local = lambda req: httpx.Response(503, json={"error": "busy"})
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["x-spillover-route"] == "hosted"
    assert r.headers["x-spillover-reason"] == "local-error"
    assert len(world.bodies("local")) == 1 and len(world.bodies("hosted")) == 1


async def test_everything_failing_is_a_502_naming_each(client: httpx.AsyncClient,
                                                       world: World) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(500, text="boom")
    r = await client.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(r, 502)
    assert "mistral: answered 500" in str(err["message"])


async def test_hosted_429_everywhere_is_429_with_retry_after(client: httpx.AsyncClient,
                                                             world: World) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(429, headers={"retry-after": "7"},
                                              json={"message": "rate limited"})
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(r, 429)
    assert r.headers["retry-after"] == "7"


async def test_upstream_4xx_is_passed_on_in_openai_shape(client: httpx.AsyncClient,
                                                         world: World) -> None:
    world.local = lambda req: httpx.Response(400, json={
        "object": "error", "message": "This model's maximum context length is 2048",
        "type": "BadRequestError", "param": None, "code": 400})
    r = await client.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(r, 400)
    assert "maximum context length" in str(err["message"])
    assert len(world.bodies("hosted")) == 0  # a caller error is not retried elsewhere


async def test_mistral_translation_and_ids_mapped_back(client: httpx.AsyncClient,
                                                       world: World) -> None:
    world.local_up = False

    def hosted(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        sent_id = body["messages"][1]["tool_calls"][0]["id"]
        return httpx.Response(200, json=completion(body["model"], "ok", tool_calls=[
            {"id": sent_id, "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]))

    world.hosted = hosted
    req = {
        "model": "demo", "seed": 7, "user": "u-1", "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "call f"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_abcdefghijklmnop", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_abcdefghijklmnop", "content": "42"},
        ],
    }
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    sent = world.bodies("hosted")[0]
    assert sent["random_seed"] == 7 and "seed" not in sent and "user" not in sent
    assert sent["tool_choice"] == "any"
    new_id = sent["messages"][1]["tool_calls"][0]["id"]
    assert len(new_id) == 9 and new_id.isalnum()
    assert sent["messages"][2]["tool_call_id"] == new_id
    # The caller sees the id it sent, not the one La Plateforme saw.
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == "call_abcdefghijklmnop"


async def test_stream_local_passes_chunks_and_drops_unrequested_usage(
        client: httpx.AsyncClient, world: World) -> None:
    world.local = lambda req: httpx.Response(200, content=sse([
        chunk("demo", "Hel"), chunk("demo", "lo", finish="stop"),
        chunk("demo", usage=(3, 2))]), headers={"content-type": "text/event-stream"})
    async with client.stream("POST", "/v1/chat/completions",
                             json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-spillover-route"] == "local"
        text = (await r.aread()).decode()
    assert world.bodies("local")[0]["stream_options"] == {"include_usage": True}
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert [p["choices"][0]["delta"].get("content") for p in payloads] == ["Hel", "lo"]
    assert all("usage" not in p for p in payloads)


async def test_stream_keeps_usage_when_caller_asked(client: httpx.AsyncClient,
                                                    world: World) -> None:
    world.local = lambda req: httpx.Response(200, content=sse([
        chunk("demo", "x", finish="stop"), chunk("demo", usage=(3, 1))]))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        text = (await r.aread()).decode()
    usage_events = [json.loads(e[6:]) for e in text.split("\n\n")
                    if e.startswith("data: {") and '"usage"' in e]
    assert usage_events[-1]["usage"]["completion_tokens"] == 1


async def test_stream_failing_before_first_event_fails_over(client: httpx.AsyncClient,
                                                            world: World) -> None:
    world.local = lambda req: httpx.Response(500, text="engine error")
    world.hosted = lambda req: httpx.Response(200, content=sse([
        chunk("mistral-small-latest", "hosted", finish="stop")]))
    async with client.stream("POST", "/v1/chat/completions",
                             json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-spillover-route"] == "hosted"
        text = (await r.aread()).decode()
    assert "hosted" in text and text.endswith("data: [DONE]\n\n")


async def test_stream_breaking_midway_ends_with_error_event(client: httpx.AsyncClient,
                                                            world: World) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: " + json.dumps(chunk("demo", "first")).encode() + b"\n\n"
            raise httpx.ReadError("connection reset")

    world.local = lambda req: httpx.Response(200, stream=Broken())
    async with client.stream("POST", "/v1/chat/completions",
                             json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        text = (await r.aread()).decode()
    last = [e for e in text.split("\n\n") if e][-1]
    assert json.loads(last[6:])["error"]["type"] == "upstream_error"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "demo"}', 400, "messages"),
        (b'{"model": "demo", "messages": []}', 400, "messages"),
        (b'{"model": "demo", "messages": [{"role": "wizard"}]}', 400, "messages[0].role"),
        (b'{"model": "demo", "messages": "hi"}', 400, "messages"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "demo", "stream": "yes", "messages": [{"role": "user"}]}', 400, "stream"),
        (b'{"model": "demo", "max_tokens": -1, "messages": [{"role": "user"}]}', 400,
         "max_tokens"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (b"\xff\xfe{}", 400, None),
        (b"[" * 5000 + b"]" * 5000, 400, None),
    ],
)
async def test_bad_input_is_an_openai_error(client: httpx.AsyncClient, world: World,
                                            body: bytes, status: int,
                                            param: str | None) -> None:
    r = await client.post("/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    err = assert_openai_error(r, status)
    assert err["param"] == param
    assert world.seen == []


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    r = await client.post("/v1/chat/completions", json=big)
    assert_openai_error(r, 413)


async def test_unknown_path_and_method(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_models_and_health(client: httpx.AsyncClient, world: World) -> None:
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["demo"]
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["aliases"]["demo"]["ready"] is True


async def test_key_never_leaks(client: httpx.AsyncClient, world: World,
                               caplog: pytest.LogCaptureFixture) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(401, json={"message": f"bad key {HOSTED}"})
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert "sk-test-secret" not in r.text
    assert "sk-test-secret" not in caplog.text


# FastLaneApp (router/http/fastlane.py) takes the proxied endpoints before FastAPI's
# layers; what it does not take must still be served the usual way.

async def test_unexpected_error_on_the_proxied_path_is_an_openai_500(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    app = gateway_app(world, env={})

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("sk-internal-detail")

    async with lifespan_client(app, raise_app_exceptions=False) as c:
        app.state.runtime.gateway.plan = broken
        r = await c.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(r, 500)
    assert "sk-internal-detail" not in r.text
    assert err["message"] == "internal error in the gateway"
    assert caplog.text.count("unhandled RuntimeError on /v1/chat/completions") == 1
    assert world.seen == []


async def test_requests_the_gateway_api_does_not_take_are_served_by_the_routes(
        world: World) -> None:
    app = gateway_app(world, env={})
    async with app.router.lifespan_context(app):
        # Mounted under a prefix (root_path): FastAPI's own routing serves it, the same.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/gw"),
                                     base_url="http://router") as c:
            r = await c.post("/gw/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            assert r.headers["x-spillover-reason"] == "local-ok"
            missing = await c.post("/gw/v1/chat/completions", json={**CHAT, "model": "nope"})
            assert assert_openai_error(missing, 404)["code"] == "model_not_found"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://router") as c:
            # Not a POST: the routes answer, in the same error shape.
            assert_openai_error(await c.get("/v1/chat/completions"), 405)
    assert len(world.bodies("local")) == 1
