"""Anthropic's Messages API end to end: the `anthropic` SDK as the caller, the real vLLM CPU
engine locally, the fake La Plateforme when forced hosted; ledger rows against what the
client received."""

from __future__ import annotations

import socket
import time
from typing import Any

import anthropic
import httpx2
import pytest

from router.accounting.ledger import Ledger, LedgerRow
from router.providers.tool_ids import mistral_tool_id
from tests.e2e.conftest import Engine, Hosted, Router

pytestmark = pytest.mark.e2e

HELLO: Any = [{"role": "user", "content": "Say hello"}]
WEATHER: Any = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "properties": {"city": {"type": "string",
                                                    "enum": ["Paris", "Lyon"]}},
                            "required": ["city"]}}
HOSTED = {"x-spillover-route": "hosted"}


def client(router: Router) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.url, api_key="unused-in-open-mode",
                               max_retries=0, timeout=60)


def row(router: Router, rid: str, timeout: float = 10) -> LedgerRow:
    assert router.config is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ledger = Ledger(router.config["server"]["ledger_path"])
        try:
            rows = {r.request_id: r for r in ledger.rows(since=0, until=time.time() + 60)}
        finally:
            ledger.close()
        if rid in rows:
            return rows[rid]
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {rid}")


@pytest.mark.parametrize("route", ["local", "hosted"])
def test_create_and_stream(router: Router, plateforme: Hosted, route: str) -> None:
    c = client(router)
    headers = HOSTED if route == "hosted" else {}
    raw = c.messages.with_raw_response.create(model="demo", max_tokens=8, messages=HELLO,
                                              system="Be brief.", extra_headers=headers)
    msg = raw.parse()
    assert raw.headers["x-spillover-route"] == route
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "demo"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.content and msg.content[0].type == "text"
    r = row(router, raw.headers["request-id"])
    assert r.endpoint == "messages" and r.route == route
    assert (r.prompt_tokens, r.completion_tokens) == (msg.usage.input_tokens,
                                                      msg.usage.output_tokens)
    assert 1 <= msg.usage.output_tokens <= 8

    with c.messages.stream(model="demo", max_tokens=10, messages=HELLO,
                           extra_headers=headers) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["request-id"]
        assert stream.response.headers["x-spillover-route"] == route
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    r = row(router, rid)
    assert r.endpoint == "messages" and r.status == 200
    assert (r.prompt_tokens, r.completion_tokens) == (final.usage.input_tokens,
                                                      final.usage.output_tokens)
    assert final.usage.output_tokens >= 1


def test_two_turn_tool_use_moves_from_local_to_hosted(router: Router,
                                                      plateforme: Hosted) -> None:
    c = client(router)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = c.messages.create(model="demo", max_tokens=96, messages=messages, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"},
                              # anthropic 2.x's create() no longer takes temperature: the
                              # field is sent as Anthropic documents it all the same
                              extra_body={"temperature": 0})
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses, first
    use = uses[0]
    assert first.stop_reason == "tool_use" and use.name == "get_weather"
    assert use.input in ({"city": "Paris"}, {"city": "Lyon"})
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "18 degrees, sunny"}]}]
    second = c.messages.create(model="demo", max_tokens=16, messages=messages,
                               tools=[WEATHER], extra_headers=HOSTED)
    assert second.content
    sent = plateforme.fake.requests_to("/v1/chat/completions")[-1].body
    sent_id = sent["messages"][1]["tool_calls"][0]["id"]
    assert len(sent_id) == 9 and sent_id.isalnum()
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": sent_id,
                                   "content": "18 degrees, sunny"}


def test_count_tokens_from_the_engine(router: Router) -> None:
    c = client(router)
    raw = c.messages.with_raw_response.count_tokens(model="demo", messages=HELLO)
    assert raw.headers["x-spillover-token-count"] == "engine"
    counted = raw.parse().input_tokens
    msg = c.messages.create(model="demo", max_tokens=4, messages=HELLO)
    assert counted == msg.usage.input_tokens


def test_errors_raise_the_sdks_own_exceptions(router: Router) -> None:
    c = client(router)
    with pytest.raises(anthropic.NotFoundError) as nf:
        c.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    assert nf.value.status_code == 404
    with pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model="demo", max_tokens=4, messages=[{"role": "system",
                                                                "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


# -- issue 15: the engine's own /v1/messages ------------------------------------------

def engine_posts(engine: Engine, path: str) -> int:
    """Requests the engine itself logged on `path` and answered 200 (its access log)."""
    text = engine.process.log_path.read_text(errors="replace")
    return text.count(f'"POST {path} HTTP/1.1" 200')


def native_ready(router: Router, api: str) -> None:
    router.wait_for(lambda s: s["engines"]["demo-local"]["apis"][api]["native"], 10,
                    f"the engine's {api} API probed")


def test_served_by_the_engines_own_messages_endpoint(router: Router, engine: Engine) -> None:
    native_ready(router, "messages")
    c = client(router)
    before = engine_posts(engine, "/v1/messages")
    raw = c.messages.with_raw_response.create(model="demo", max_tokens=8, messages=HELLO,
                                              system="Be brief.")
    msg = raw.parse()
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.headers["x-spillover-upstream-api"] == "messages"
    assert msg.model == "demo" and msg.id.startswith("msg_")
    r = row(router, raw.headers["request-id"])
    assert (r.endpoint, r.status) == ("messages", 200)
    assert (r.prompt_tokens, r.completion_tokens) == (msg.usage.input_tokens,
                                                      msg.usage.output_tokens)
    with c.messages.stream(model="demo", max_tokens=10, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["request-id"]
        assert stream.response.headers["x-spillover-upstream-api"] == "messages"
    assert final.content[0].type == "text" and final.content[0].text == text
    r = row(router, rid)
    assert (r.status, r.prompt_tokens, r.completion_tokens) == (
        200, final.usage.input_tokens, final.usage.output_tokens)
    assert final.usage.output_tokens >= 1
    # The engine's own log: both went to its /v1/messages, not to chat completions.
    assert engine_posts(engine, "/v1/messages") == before + 2


def test_tool_use_from_the_engines_messages_endpoint_then_la_plateforme(
        router: Router, plateforme: Hosted) -> None:
    native_ready(router, "messages")
    c = client(router)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    raw = c.messages.with_raw_response.create(
        model="demo", max_tokens=96, messages=messages, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert raw.headers["x-spillover-upstream-api"] == "messages"
    first = raw.parse()
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use.input in ({"city": "Paris"},
                                                            {"city": "Lyon"})
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "18 degrees, sunny"}]}]
    second = c.messages.create(model="demo", max_tokens=16, messages=messages,
                               tools=[WEATHER], extra_headers=HOSTED)
    assert second.content
    sent = plateforme.fake.requests_to("/v1/chat/completions")[-1].body
    sent_id = sent["messages"][1]["tool_calls"][0]["id"]
    # vLLM's own id is already Mistral's shape: La Plateforme gets it as the caller saw it.
    assert sent_id == mistral_tool_id(use.id) and len(sent_id) == 9 and sent_id.isalnum()
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": sent_id,
                                   "content": "18 degrees, sunny"}


def test_count_tokens_with_tools_matches_the_native_create(router: Router) -> None:
    """A native create's prompt is vLLM's own conversion of the Messages request (tools
    included), not the chat path's: count_tokens asks the same endpoint."""
    native_ready(router, "messages")
    c = client(router)
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    raw = c.messages.with_raw_response.count_tokens(model="demo", messages=ask,
                                                    tools=[WEATHER])
    assert raw.headers["x-spillover-token-count"] == "engine"
    raw_msg = c.messages.with_raw_response.create(model="demo", max_tokens=4, messages=ask,
                                                  tools=[WEATHER])
    assert raw_msg.headers["x-spillover-upstream-api"] == "messages"
    assert raw.parse().input_tokens == raw_msg.parse().usage.input_tokens


def test_caller_gone_mid_native_stream(router: Router, engine: Engine) -> None:
    native_ready(router, "messages")
    # A slow reader with small buffers and a long answer: the whole stream cannot sit in
    # the sockets' buffers before the caller leaves (200 tokens did, and was booked 200).
    # (The anthropic package runs on httpx2, the httpx fork it depends on.)
    http = anthropic.DefaultHttpxClient(timeout=60, transport=httpx2.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]))
    c = client(router).with_options(http_client=http)
    before = engine_posts(engine, "/v1/messages")
    with c.messages.stream(model="demo", max_tokens=1900, messages=HELLO,
                           extra_body={"temperature": 1}) as stream:
        rid = stream.response.headers["request-id"]
        assert stream.response.headers["x-spillover-upstream-api"] == "messages"
        for _ in stream.text_stream:
            break  # the caller leaves after its first text
    http.close()
    r = row(router, rid)
    assert (r.endpoint, r.status) == ("messages", 499)
    # Booked as a cut chat stream is: the prompt's upper bound, a token per relayed delta.
    assert r.prompt_tokens > 0 and 1 <= r.completion_tokens < 1900
    assert engine_posts(engine, "/v1/messages") == before + 1
