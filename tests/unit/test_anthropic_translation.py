"""Messages <-> chat completions, both ways, as tables (router.providers.anthropic)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import InvalidRequest
from router.providers.anthropic import (
    MessageStream,
    anthropic_error,
    chat_to_message,
    error_from_openai,
    request_to_chat,
)
from router.providers.mistral import MistralTranslator

BASE: dict[str, Any] = {"model": "demo", "max_tokens": 64}
TOOL = {"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def req(**kw: Any) -> dict[str, Any]:
    return {**BASE, "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize(("body", "expected"), [
    (req(), {"model": "demo", "max_tokens": 64,
             "messages": [{"role": "user", "content": "hi"}]}),
    (req(system="be brief"), {"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi"}]}),
    (req(system=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
     {"messages": [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}]}),
    (req(stop_sequences=["END"], temperature=0.5, top_p=0.9, top_k=5),
     {"stop": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 5}),
    (req(stream=True), {"stream": True, "stream_options": {"include_usage": True}}),
    (req(metadata={"user_id": "u-1"}), {"user": "u-1"}),
    (req(tools=[TOOL]), {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": TOOL["input_schema"]}}]}),
    (req(tools=[TOOL], tool_choice={"type": "auto"}), {"tool_choice": "auto"}),
    (req(tools=[TOOL], tool_choice={"type": "any"}), {"tool_choice": "required"}),
    (req(tools=[TOOL], tool_choice={"type": "none"}), {"tool_choice": "none"}),
    (req(tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather",
                                    "disable_parallel_tool_use": True}),
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "parallel_tool_calls": False}),
    (req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBOR"}}]}]),
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]}]}),
    # A tool round trip: the assistant's tool_use becomes tool_calls, the user's
    # tool_result a tool message placed before the rest of that user turn.
    (req(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A",
             "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "thanks"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02B",
                                           "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02B",
                                      "content": "no such city", "is_error": True}]}]),
     {"messages": [
         {"role": "user", "content": "weather?"},
         {"role": "assistant", "content": "Let me look.", "tool_calls": [
             {"id": "toolu_01A", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
         {"role": "tool", "tool_call_id": "toolu_01A", "content": "sunny"},
         {"role": "user", "content": "thanks"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "toolu_02B", "type": "function",
              "function": {"name": "get_weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "toolu_02B", "content": "Error: no such city"}]}),
])
def test_request_to_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    out = request_to_chat(body)
    for key, value in expected.items():
        assert out[key] == value, key


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    (req(max_tokens=0), "max_tokens"),
    ({**BASE}, "messages"),
    (req(messages=[]), "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    (req(messages=[{"role": "system", "content": "x"}]), "messages.0.role"),
    (req(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (req(messages=[{"role": "user", "content": [{"type": "document"}]}]),
     "messages.0.content.0"),
    (req(system=[{"type": "image"}]), "system.0"),
    (req(temperature=1.5), "temperature"),
    (req(top_k=-1), "top_k"),
    (req(stop_sequences="END"), "stop_sequences"),
    (req(stream="yes"), "stream"),
    (req(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools.0"),
    (req(tools=[{"name": "x"}]), "tools.0.input_schema"),
    (req(tool_choice={"type": "required"}), "tool_choice"),
    (req(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]),
     "messages.0.content.0.tool_use_id"),
    (req(messages=[{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "x"}}]}]),
     "messages.0.content.0.source"),
])
def test_request_refused_with_the_field_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        request_to_chat(body)
    assert exc.value.param == param
    assert exc.value.status == 400


def test_count_tokens_request_needs_no_max_tokens() -> None:
    out = request_to_chat({"model": "demo", "messages": [{"role": "user", "content": "x"}],
                           "tools": [TOOL]}, count_only=True)
    assert "max_tokens" not in out and out["tools"][0]["function"]["name"] == "get_weather"


def chat(content: str | None = "hello", tool_calls: list[Any] | None = None,
         finish: str = "stop", matched: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"id": "chatcmpl-abc123", "object": "chat.completion", "model": "x",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish,
                         "stop_reason": matched}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


@pytest.mark.parametrize(("data", "content", "stop", "sequence"), [
    (chat(), [{"type": "text", "text": "hello"}], "end_turn", None),
    (chat(finish="length"), [{"type": "text", "text": "hello"}], "max_tokens", None),
    (chat(finish="model_length"), [{"type": "text", "text": "hello"}], "max_tokens", None),
    (chat(matched="END"), [{"type": "text", "text": "hello"}], "stop_sequence", "END"),
    # A stop string the caller did not send (the engine's own EOS text) is the turn's end.
    (chat(matched="</s>"), [{"type": "text", "text": "hello"}], "end_turn", None),
    (chat(None, [{"id": "abcDEF123", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}], "tool_calls"),
     [{"type": "tool_use", "id": "abcDEF123", "name": "get_weather",
       "input": {"city": "Oslo"}}], "tool_use", None),
    # vLLM answers a named tool_choice with finish_reason "stop": still a tool_use.
    (chat(None, [{"id": "t2", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}], "stop"),
     [{"type": "tool_use", "id": "t2", "name": "f", "input": {}}], "tool_use", None),
    (chat("", [{"id": "t1", "type": "function", "function": {
        "name": "f", "arguments": "not json"}}], "tool_calls"),
     [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}], "tool_use", None),
])
def test_chat_to_message(data: dict[str, Any], content: list[Any], stop: str,
                         sequence: str | None) -> None:
    msg = chat_to_message(data, "demo", ["END"])
    assert msg == {"id": "msg_abc123", "type": "message", "role": "assistant",
                   "model": "demo", "content": content, "stop_reason": stop,
                   "stop_sequence": sequence,
                   "usage": {"input_tokens": 12, "output_tokens": 3}}


def parse(events: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for raw in b"".join(events).split(b"\n\n"):
        if not raw:
            continue
        name, data = raw.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:].decode()
        out.append((name[7:].decode(), payload))
    return out


def ck(delta: dict[str, Any] | None = None, finish: str | None = None,
       usage: tuple[int, int] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"id": "chatcmpl-s1", "choices": [] if delta is None else [
        {"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        c["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return c


def run_stream(chunks: list[dict[str, Any]], done: bool = True) -> list[tuple[str, Any]]:
    s = MessageStream("demo")
    events: list[bytes] = []
    for c in chunks:
        events.extend(s.feed(c))
    if done:
        events.extend(s.done())
    return parse(events)


def test_stream_text_then_tool_call() -> None:
    events = run_stream([
        ck({"role": "assistant", "content": ""}),
        ck({"content": "Let"}), ck({"content": " me"}),
        ck({"tool_calls": [{"index": 0, "id": "abcDEF123", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
        ck({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        ck({"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}),
        ck({}, finish="tool_calls"),
        ck(usage=(20, 7)),
    ])
    names = [n for n, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "content_block_start",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"] == "msg_s1" and start["content"] == [] and start["model"] == "demo"
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Let"}
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "abcDEF123",
                                             "name": "get_weather", "input": {}}
    assert events[6][1]["index"] == 1
    partial = "".join(e["delta"]["partial_json"] for n, e in events
                      if n == "content_block_delta" and e["index"] == 1)
    assert json.loads(partial) == {"city": "Oslo"}
    assert events[10][1] == {"type": "message_delta",
                             "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 20, "output_tokens": 7}}


def test_stream_tool_call_ended_by_stop_is_tool_use() -> None:
    events = run_stream([
        ck({"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f",
                                                                 "arguments": "{}"}}]}),
        ck({}, finish="stop")])
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_stream_cut_midway_has_no_message_stop_and_an_error_event() -> None:
    s = MessageStream("demo")
    events = s.feed(ck({"content": "Hel"}))
    events.append(s.error(502, "the upstream stream broke off"))
    parsed = parse(events)
    assert [n for n, _ in parsed] == ["message_start", "ping", "content_block_start",
                                      "content_block_delta", "error"]
    assert parsed[-1][1] == {"type": "error", "error": {
        "type": "api_error", "message": "the upstream stream broke off"}}


def test_stream_with_no_content_still_makes_a_whole_message() -> None:
    events = run_stream([ck({}, finish="stop", usage=(3, 0))])
    assert [n for n, _ in events] == ["message_start", "ping", "message_delta",
                                      "message_stop"]


@pytest.mark.parametrize(("status", "expected_status", "kind"), [
    (400, 400, "invalid_request_error"), (401, 401, "authentication_error"),
    (403, 403, "permission_error"), (404, 404, "not_found_error"),
    (413, 413, "request_too_large"), (415, 415, "invalid_request_error"),
    (429, 429, "rate_limit_error"), (500, 500, "api_error"), (502, 502, "api_error"),
    (503, 529, "overloaded_error"), (504, 504, "timeout_error"),
])
def test_error_shape_and_status(status: int, expected_status: int, kind: str) -> None:
    got, body = anthropic_error(status, "why", "req-1")
    assert got == expected_status
    assert body == {"type": "error", "error": {"type": kind, "message": "why"},
                    "request_id": "req-1"}


def test_openai_error_body_keeps_its_message() -> None:
    status, body = error_from_openai(
        503, b'{"error": {"message": "no capacity", "type": "service_unavailable"}}')
    assert status == 529 and body["error"] == {"type": "overloaded_error",
                                               "message": "no capacity"}


def test_tool_ids_map_to_mistral_and_back_consistently_across_turns() -> None:
    """A conversation that moves to La Plateforme: the caller's toolu_ ids become the same
    9-character ids in every turn, and an answer's ids come back as the caller's."""
    turn = req(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01XyZ",
                                           "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01XyZ",
                                      "content": "sunny"}]}])
    t = MistralTranslator()
    first = t.request("chat", request_to_chat(turn), "mistral-small", include_usage=True)
    msgs = first.body["messages"]
    mid = msgs[1]["tool_calls"][0]["id"]
    assert len(mid) == 9 and mid.isalnum() and msgs[2]["tool_call_id"] == mid
    # The next turn repeats the history: the same id again, no state kept between turns.
    later = t.request("chat", request_to_chat(turn), "mistral-small", include_usage=True)
    assert later.body["messages"][1]["tool_calls"][0]["id"] == mid
    # The answer echoing that id gives the caller its own id back.
    answer = chat(None, [{"id": mid, "type": "function",
                          "function": {"name": "get_weather", "arguments": "{}"}}],
                  "tool_calls")
    t.response(first, answer)
    assert chat_to_message(answer, "demo")["content"][0]["id"] == "toolu_01XyZ"


# Optional fields the translation does not read, or reads only in part, of a wrong type:
# refused as Anthropic refuses them, a 400 naming the field.
@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": {}}},
     "tool_choice.disable_parallel_tool_use", "valid boolean"),
    ({"tool_choice": {"type": "tool", "name": "get_weather",
                      "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use", "valid boolean"),
    ({"metadata": 5}, "metadata", ""),
    ({"metadata": {"user_id": 5}}, "metadata.user_id", ""),
    ({"top_k": "x"}, "top_k", ""),
    ({"top_k": 2.5}, "top_k", ""),
    ({"stop_sequences": "x"}, "stop_sequences", ""),
    ({"service_tier": 3}, "service_tier", "'auto' or 'standard_only'"),
    ({"service_tier": "fast"}, "service_tier", "'auto' or 'standard_only'"),
    ({"thinking": "on"}, "thinking", "valid dictionary"),
    ({"context_management": []}, "context_management", "valid dictionary"),
    ({"container": 7}, "container", ""),
    ({"betas": "x"}, "betas", "valid list"),
    ({"temperature": "0.5"}, "temperature", ""),
    ({"stream": "true"}, "stream", ""),
    ({"system": [{"type": "text", "text": "a", "cache_control": None}, {"type": "text"}]},
     "system.1", ""),
    ({"tools": [{**TOOL, "description": 5}]}, "tools.0.description", "valid string"),
    ({"tools": [{**TOOL, "name": "get weather"}]}, "tools.0.name", "pattern"),
    ({"tools": [{**TOOL, "type": None}]}, "tools.0.type", ""),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": "yes"}]}]},
     "messages.0.content.1.is_error", "valid boolean"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": 5}]}]}]},
     "messages.0.content.0.content.0", "text only"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]},
     "messages.1.content", ""),
    ({"response_format": {"type": "json_object"}}, "response_format",
     "Extra inputs are not permitted"),
    ({"n": 2}, "n", "Extra inputs are not permitted"),
])
def test_a_wrong_typed_or_unknown_field_is_refused_naming_it(
        extra: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({**req(), **extra})
    assert info.value.status == 400 and info.value.param == param, info.value.message
    assert info.value.message.startswith(f"{param}: ") and says in info.value.message


def test_count_tokens_refuses_what_only_a_create_takes() -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert request_to_chat(body, count_only=True)["messages"]
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({**body, "max_tokens": 5}, count_only=True)
    assert info.value.param == "max_tokens" and "Extra inputs" in info.value.message


@pytest.mark.parametrize("documented", [
    {"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"service_tier": "auto"},
    {"container": None}, {"context_management": {"edits": []}}, {"metadata": {}},
    {"top_k": None}, {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
    {"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]},
])
def test_documented_fields_it_does_not_use_are_taken(documented: dict[str, Any]) -> None:
    assert request_to_chat({**req(), **documented})["model"] == "demo"


# Anthropic validates with pydantic, whose lax mode takes an integral float for an int:
# so does the gateway (router.providers.shapes.integral); a fraction stays refused.
@pytest.mark.parametrize(("field", "sent", "chat_field", "taken"), [
    ("max_tokens", 30.0, "max_tokens", 30), ("top_k", 5.0, "top_k", 5),
])
def test_an_integer_written_as_a_float_is_taken_as_the_integer(
        field: str, sent: float, chat_field: str, taken: int) -> None:
    out = request_to_chat({**req(), field: sent})
    assert out[chat_field] == taken and isinstance(out[chat_field], int)
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({**req(), field: sent + 0.5})
    assert info.value.param == field
    for wrong in ("30", True):
        with pytest.raises(InvalidRequest):
            request_to_chat({**req(), field: wrong})
