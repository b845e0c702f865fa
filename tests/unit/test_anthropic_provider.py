"""A hosted provider of kind `anthropic` (Claude) behind an alias, through the ASGI app,
against the Anthropic double in tests/fakes (which refuses what Anthropic refuses)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml

from router.app import Settings, create_app
from router.providers.anthropic_upstream import ChatChunks, chat_to_request, message_to_chat
from router.routing.auth import key_digest
from router.runtime import Runtime
from tests.fakes.anthropic import DEFAULT_API_KEY, FakeAnthropic, Invalid, validate
from tests.unit.helpers import BASE_YAML, HOSTED_KEY, World, config

KEY = "sk-caller-claude"
CLAUDE = "https://api.anthropic.test/v1"
CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
MSG: dict[str, Any] = {**CHAT, "max_tokens": 32}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HOSTED = {"x-spillover-route": "hosted"}


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def claude() -> FakeAnthropic:
    return FakeAnthropic()


@pytest.fixture
async def client(world: World, claude: FakeAnthropic,
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    data = yaml.safe_load(BASE_YAML)
    data["providers"]["claude"] = {"kind": "anthropic", "base_url": CLAUDE,
                                   "api_key_env": "ANTHROPIC_API_KEY",
                                   "timeouts": {"connect": 1, "read": 2, "write": 1, "pool": 1}}
    data["aliases"]["demo"]["hosted"] = [{
        "provider": "claude", "model": "claude-sonnet-4-5",
        "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}]
    data["callers"] = {"app": {"key_sha256": [key_digest(KEY)], "may_force_route": True}}
    plain = world.transport()

    def route(req: httpx.Request) -> httpx.Response:
        if str(req.url).startswith(CLAUDE):
            return claude.handle(req)
        return plain.handler(req)  # type: ignore[return-value]

    app = create_app(Settings(env={"ANTHROPIC_API_KEY": DEFAULT_API_KEY,
                                   "MISTRAL_API_KEY": HOSTED_KEY}),
                     config=config(yaml.safe_dump(data)), transport=httpx.MockTransport(route))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router",
        headers={"authorization": f"Bearer {KEY}"},
    ) as c:
        yield c, app.state.runtime


async def rows(rt: Runtime, n: int) -> list[Any]:
    import asyncio

    for _ in range(100):
        got = rt.ledger.rows(since=0, until=time.time() + 60)
        if len(got) >= n:
            return list(got)
        await asyncio.sleep(0.02)
    return list(rt.ledger.rows(since=0, until=time.time() + 60))


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# -- the double refuses what Anthropic refuses ---------------------------------------

@pytest.mark.parametrize(("body", "words"), [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({**MSG, "messages": [{"role": "system", "content": "x"},
                          {"role": "user", "content": "x"}]}, "top-level `system`"),
    ({**MSG, "messages": [{"role": "user", "content": "a"},
                          {"role": "user", "content": "b"}]}, "alternate"),
    ({**MSG, "messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": [
                              {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                          {"role": "user", "content": "b"}]}, "without `tool_result`"),
    ({**MSG, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}, "unexpected"),
    ({**MSG, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "tag"),
    ({**MSG, "stop": ["x"]}, "Extra inputs"),
])
def test_the_double_refuses_like_anthropic(body: dict[str, Any], words: str) -> None:
    with pytest.raises(Invalid, match=words.replace("`", ".")):
        validate(body)


# -- translation ---------------------------------------------------------------------

def test_chat_conversation_with_tools_becomes_a_valid_messages_request() -> None:
    chat = {"model": "demo", "max_tokens": 50, "temperature": 1.5, "stop": "END",
            "user": "u1", "tools": TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "Abc123XyZ", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
                {"role": "tool", "tool_call_id": "Abc123XyZ", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
                {"role": "user", "content": [
                    {"type": "text", "text": "and this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            ]}
    out = chat_to_request(chat, "claude-sonnet-4-5")
    validate(out)
    assert out["system"] == "be brief" and out["model"] == "claude-sonnet-4-5"
    assert out["temperature"] == 1.0 and out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u1"} and out["max_tokens"] == 50
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    uses = out["messages"][1]["content"]
    assert [u["input"] for u in uses] == [{"city": "Oslo"}, {"city": "Rome"}]
    last = out["messages"][2]["content"]
    assert [b["type"] for b in last] == ["tool_result", "tool_result", "text", "image"]
    assert last[3]["source"] == {"type": "base64", "media_type": "image/png", "data": "AAAA"}


def test_message_and_its_stream_become_chat() -> None:
    msg = {"id": "msg_1", "model": "claude", "stop_reason": "tool_use",
           "content": [{"type": "text", "text": "let me see"},
                       {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
           "usage": {"input_tokens": 3, "output_tokens": 4}}
    chat = message_to_chat(msg, "claude")
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "let me see"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                             "arguments": '{"a":1}'}
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    conv = ChatChunks("demo")
    stream = FakeAnthropic()._events({**msg, "model": "claude"})
    out = [conv.convert(e) for e in stream.split(b"\n\n") if e]
    chunks = [json.loads(o[6:]) for o in out if o is not None and o != b"data: [DONE]\n\n"]
    assert out[-1] == b"data: [DONE]\n\n"
    calls = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
    args = "".join(c[0]["function"]["arguments"] for c in calls if c)
    assert json.loads(args) == {"a": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 12  # from message_start


# -- through the app -----------------------------------------------------------------

async def test_chat_to_claude_translated_with_anthropic_auth(client: Any,
                                                              claude: FakeAnthropic) -> None:
    c, rt = client
    r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}, headers=HOSTED)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "claude answer"
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 7
    headers, sent = claude.requests[0]
    assert headers["x-api-key"] == DEFAULT_API_KEY and headers["anthropic-version"]
    assert "authorization" not in headers
    assert sent["model"] == "claude-sonnet-4-5" and sent["max_tokens"] == 20
    (row,) = await rows(rt, 1)
    assert (row.route, row.prompt_tokens, row.completion_tokens) == ("hosted", 12, 7)
    assert row.cost_usd == pytest.approx(12 * 3e-6 + 7 * 15e-6)


async def test_chat_without_max_tokens_gets_the_held_bound(client: Any,
                                                           claude: FakeAnthropic) -> None:
    c, _ = client
    r = await c.post("/v1/chat/completions", json=CHAT, headers=HOSTED)
    assert r.status_code == 200, r.text
    assert isinstance(claude.requests[0][1]["max_tokens"], int)
    assert claude.refused == []


async def test_chat_tool_round_trip_through_claude(client: Any,
                                                   claude: FakeAnthropic) -> None:
    c, _ = client
    first = await c.post("/v1/chat/completions",
                         json={**CHAT, "tools": TOOLS, "tool_choice": "auto"}, headers=HOSTED)
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    history = [*CHAT["messages"], choice["message"],
               {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    second = await c.post("/v1/chat/completions",
                          json={**CHAT, "messages": history, "tools": TOOLS}, headers=HOSTED)
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == "claude answer"
    assert claude.refused == []
    sent = claude.requests[1][1]["messages"]
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": call["id"],
                                     "content": "sunny"}


async def test_chat_stream_from_claude(client: Any, claude: FakeAnthropic) -> None:
    c, rt = client
    r = await c.post("/v1/chat/completions",
                     json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                     headers=HOSTED)
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    chunks = sse_data(r.text)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks
                   if ch.get("choices"))
    assert text == "claude answer"
    assert chunks[-1]["usage"]["prompt_tokens"] == 12
    assert claude.requests[0][1]["stream"] is True
    assert "stream_options" not in claude.requests[0][1]
    (row,) = await rows(rt, 1)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 12, 7)


async def test_chat_stream_tool_call_from_claude(client: Any) -> None:
    c, _ = client
    r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True, "tools": TOOLS},
                     headers=HOSTED)
    chunks = sse_data(r.text)
    calls = [ch["choices"][0]["delta"]["tool_calls"][0] for ch in chunks
             if ch.get("choices") and ch["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"].startswith("toolu_") and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(x["function"]["arguments"] for x in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_messages_pass_through_to_claude_natively(client: Any, world: World,
                                                        claude: FakeAnthropic) -> None:
    c, rt = client
    body = {**MSG, "system": [{"type": "text", "text": "be brief"}], "top_k": 3,
            "metadata": {"user_id": "u7"}}
    r = await c.post("/v1/messages", json=body, headers=HOSTED)
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["id"] == "msg_fake0001"  # Claude's own Message, not one rebuilt from chat
    assert msg["content"] == [{"type": "text", "text": "claude answer"}]
    sent = claude.requests[0][1]
    # As sent, model swapped: the system blocks and top_k were not flattened through chat.
    assert sent == {**body, "model": "claude-sonnet-4-5"}
    assert world.bodies("local") == []
    (row,) = await rows(rt, 1)
    assert (row.endpoint, row.prompt_tokens, row.completion_tokens) == ("messages", 12, 7)


async def test_messages_stream_passes_through_natively(client: Any,
                                                       claude: FakeAnthropic) -> None:
    c, rt = client
    r = await c.post("/v1/messages", json={**MSG, "stream": True}, headers=HOSTED)
    assert r.status_code == 200, r.text
    expected = FakeAnthropic()._events(FakeAnthropic()._message(
        {**MSG, "model": "claude-sonnet-4-5"}))
    # Byte for byte but the ids the double numbers per request.
    assert r.content.replace(b"msg_fake0001", b"X") == expected.replace(b"msg_fake0000", b"X")
    (row,) = await rows(rt, 1)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 12, 7)


async def test_claude_errors_map_back_to_each_api(client: Any,
                                                  claude: FakeAnthropic) -> None:
    c, _ = client
    claude.faults = [400]
    r = await c.post("/v1/chat/completions", json=CHAT, headers=HOSTED)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    claude.faults = [400]
    r = await c.post("/v1/messages", json=MSG, headers=HOSTED)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert DEFAULT_API_KEY not in r.text


async def test_claude_overloaded_529_is_retried(client: Any, claude: FakeAnthropic) -> None:
    c, _ = client
    claude.faults = [529]
    r = await c.post("/v1/chat/completions", json=CHAT, headers=HOSTED)
    assert r.status_code == 200, r.text
    assert len(claude.requests) == 2


async def test_local_engine_down_falls_back_to_claude(client: Any, world: World,
                                                      claude: FakeAnthropic) -> None:
    c, rt = client
    world.local_up = False
    r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == "hosted"
    assert r.headers["x-spillover-backend"] == "claude"
    assert r.json()["choices"][0]["message"]["content"] == "claude answer"
    m = await c.post("/v1/messages", json=MSG)
    assert m.status_code == 200, m.text
    assert m.json()["id"].startswith("msg_fake")  # native
    got = await rows(rt, 2)
    assert [row.route for row in got] == ["hosted", "hosted"]
    assert got[0].reason == "local-down"


async def test_upstream_api_header_says_claude_was_sent_messages(
        client: Any, claude: FakeAnthropic) -> None:
    """x-spillover-upstream-api names what the upstream received: Claude gets Messages,
    natively for a Messages caller, translated from chat for a Responses caller."""
    c, rt = client
    r = await c.post("/v1/messages", json=MSG, headers=HOSTED)
    assert r.status_code == 200 and r.headers["x-spillover-upstream-api"] == "messages"
    r = await c.post("/v1/responses", json={"model": "demo", "input": "hi"}, headers=HOSTED)
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == "hosted"
    assert r.headers["x-spillover-upstream-api"] == "messages"
    assert claude.requests[-1][1]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert r.json()["output"][0]["content"][0]["text"] == "claude answer"
    assert [x["upstream_api"] for x in rt.recorder.recent][:2] == ["messages", "messages"]
    r = await c.post("/v1/chat/completions", json=CHAT, headers=HOSTED)
    assert r.status_code == 200 and "x-spillover-upstream-api" not in r.headers
