"""Responses <-> chat completions translation tables, both ways, streams included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import InvalidRequest
from router.providers.mistral import MistralTranslator
from router.providers.responses import (
    ResponseStream,
    chat_to_response,
    echo,
    request_to_chat,
)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
          "required": ["city"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": SCHEMA, "strict": True}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA,
                                              "description": "Weather", "strict": True}}


def req(**kw: Any) -> dict[str, Any]:
    return {"model": "demo", "input": "hi", **kw}


@pytest.mark.parametrize(("body", "expected"), [
    (req(), {"messages": [{"role": "user", "content": "hi"}]}),
    (req(instructions="Be brief."),
     {"messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "hi"}]}),
    (req(input=[{"role": "developer", "content": "rules"},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "a"},
                             {"type": "input_text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "ok",
                                                   "annotations": []}]}]),
     {"messages": [{"role": "system", "content": "rules"}, {"role": "user", "content": "ab"},
                   {"role": "assistant", "content": "ok"}]}),
    (req(input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]}]),
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                             "detail": "low"}}]}]}),
    # Two parallel calls as consecutive items: one assistant turn, then one tool message each.
    (req(input=[{"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "call_A", "name": "get_weather",
                 "arguments": '{"city":"Oslo"}', "id": "fc_1", "status": "completed"},
                {"type": "function_call", "call_id": "call_B", "name": "get_weather",
                 "arguments": '{"city":"Rome"}'},
                {"type": "function_call_output", "call_id": "call_A", "output": "sunny"},
                {"type": "function_call_output", "call_id": "call_B",
                 "output": [{"type": "input_text", "text": "rain"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []}]),
     {"messages": [
         {"role": "user", "content": "weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_A", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
             {"id": "call_B", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
         {"role": "tool", "tool_call_id": "call_A", "content": "sunny"},
         {"role": "tool", "tool_call_id": "call_B", "content": "rain"}]}),
    (req(tools=[TOOL], tool_choice="required", parallel_tool_calls=False),
     {"tools": [CHAT_TOOL], "tool_choice": "required", "parallel_tool_calls": False}),
    (req(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}),
     {"tools": [CHAT_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    (req(max_output_tokens=64, temperature=1.5, top_p=0.9, store=True, user="u1"),
     {"max_tokens": 64, "temperature": 1.5, "top_p": 0.9, "user": "u1"}),
    (req(text={"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                          "strict": True}}),
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}}),
    (req(text={"format": {"type": "json_object"}}),
     {"response_format": {"type": "json_object"}}),
    (req(text={"format": {"type": "text"}}), {}),
    (req(stream=True), {"stream": True, "stream_options": {"include_usage": True}}),
])
def test_request_to_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    out = request_to_chat(body)
    want = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **expected}
    assert out == want


@pytest.mark.parametrize(("body", "param", "says"), [
    (req(previous_response_id="resp_1"), "previous_response_id", "stateless"),
    (req(conversation="conv_1"), "conversation", "stateless"),
    (req(background=True), "background", "stateless"),
    (req(tools=[{"type": "web_search"}]), "tools[0]", "built-in tools (web_search)"),
    (req(tools=[{"type": "file_search", "vector_store_ids": ["vs"]}]), "tools[0]",
     "built-in tools (file_search)"),
    (req(tools=[{"type": "computer_use_preview"}]), "tools[0]", "built-in tools"),
    (req(tool_choice={"type": "web_search_preview"}), "tool_choice", "not available"),
    (req(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]", "stateless"),
    (req(input=[{"type": "web_search_call", "id": "ws_1"}]), "input[0]", "built-in tools"),
    ({"input": "hi"}, "model", "model"),
    (req(input=None), "input", "input"),
    (req(input=[]), "input", "input"),
    (req(input=[{"role": "tool", "content": "x"}]), "input[0].role", "role"),
    (req(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]),
     "input[0].arguments", "string"),
    (req(max_output_tokens=0), "max_output_tokens", "max_output_tokens"),
    (req(temperature=3), "temperature", "temperature"),
    (req(top_p=True), "top_p", "top_p"),
    (req(text={"format": {"type": "json_schema", "schema": SCHEMA}}), "text.format.name",
     "name"),
    (req(text={"format": {"type": "yaml"}}), "text.format.type", "json_schema"),
    (req(stream="yes"), "stream", "boolean"),
])
def test_request_refused_with_the_field_named(body: dict[str, Any], param: str,
                                              says: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        request_to_chat(body)
    assert exc.value.param == param and exc.value.status == 400
    assert says in exc.value.message


def chat(content: str | None, calls: list[Any] | None = None, finish: str = "stop",
         usage: tuple[int, int] = (12, 4)) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return {"id": "chatcmpl-abc123", "object": "chat.completion", "model": "demo",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                      "total_tokens": sum(usage)}}


USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
         "total_tokens": 16}
CALL = {"id": "call_X1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}


@pytest.mark.parametrize(("data", "output", "status", "incomplete"), [
    (chat("Hello"), [{"id": "msg_abc123", "type": "message", "role": "assistant",
                      "status": "completed",
                      "content": [{"type": "output_text", "text": "Hello",
                                   "annotations": [], "logprobs": []}]}],
     "completed", None),
    (chat("Hel", finish="length"), [{"id": "msg_abc123", "type": "message",
                                     "role": "assistant", "status": "completed",
                                     "content": [{"type": "output_text", "text": "Hel",
                                                  "annotations": [], "logprobs": []}]}],
     "incomplete", {"reason": "max_output_tokens"}),
    (chat(None, [CALL], "tool_calls"),
     [{"id": "fc_abc123_0", "type": "function_call", "call_id": "call_X1",
       "name": "get_weather", "arguments": '{"city":"Oslo"}', "status": "completed"}],
     "completed", None),
    (chat("", finish="content_filter"), [], "incomplete", {"reason": "content_filter"}),
])
def test_chat_to_response(data: dict[str, Any], output: list[Any], status: str,
                          incomplete: Any) -> None:
    settings = echo(req(instructions="Be brief.", max_output_tokens=8, metadata={"k": "v"}))
    resp = chat_to_response(data, "demo", settings, created=1700000000)
    assert resp["id"] == "resp_abc123" and resp["object"] == "response"
    assert resp["created_at"] == 1700000000 and resp["model"] == "demo"
    assert resp["output"] == output
    assert resp["status"] == status and resp["incomplete_details"] == incomplete
    assert resp["usage"] == USAGE and resp["error"] is None
    assert resp["instructions"] == "Be brief." and resp["max_output_tokens"] == 8
    assert resp["metadata"] == {"k": "v"} and resp["store"] is False
    assert resp["previous_response_id"] is None and resp["tools"] == []


def events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for blob in raw:
        for part in blob.split(b"\n\n"):
            if part:
                name, data = part.split(b"\n")
                ev = json.loads(data.removeprefix(b"data: "))
                assert name == b"event: " + ev["type"].encode()
                out.append(ev)
    return out


def chunk(content: str | None = None, calls: list[Any] | None = None,
          finish: str | None = None, usage: tuple[int, int] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if calls is not None:
        delta["tool_calls"] = calls
    c: dict[str, Any] = {"id": "chatcmpl-s1", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        c["choices"] = []
        c["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return c


def test_stream_text_then_tool_call() -> None:
    s = ResponseStream("demo", echo(req()), created=1)
    raw: list[bytes] = []
    raw += s.feed(chunk("", None))
    raw += s.feed(chunk("Let me"))
    raw += s.feed(chunk(" check"))
    raw += s.feed(chunk(calls=[{"index": 0, "id": "call_Q", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]))
    raw += s.feed(chunk(calls=[{"index": 0, "function": {"arguments": '{"city":'}}]))
    raw += s.feed(chunk(calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}],
                        finish="tool_calls"))
    raw += s.feed(chunk(usage=(20, 7)))
    raw += s.done()
    ev = events(raw)
    assert [e["type"] for e in ev] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))
    assert ev[0]["response"]["status"] == "in_progress" and ev[0]["response"]["output"] == []
    rid = ev[0]["response"]["id"]
    msg_id = ev[2]["item"]["id"]
    assert ev[2]["output_index"] == 0 and ev[2]["item"]["status"] == "in_progress"
    assert all(e["item_id"] == msg_id for e in ev[3:8])
    assert ev[6]["text"] == "Let me check"
    fc = ev[9]["item"]
    assert fc["type"] == "function_call" and fc["call_id"] == "call_Q" and fc["arguments"] == ""
    assert ev[9]["output_index"] == 1 and fc["id"] != msg_id
    assert ev[12]["arguments"] == '{"city":"Oslo"}'
    final = ev[-1]["response"]
    assert final["id"] == rid and final["status"] == "completed"
    assert final["usage"]["input_tokens"] == 20 and final["usage"]["output_tokens"] == 7
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check"
    assert final["output"][1]["arguments"] == '{"city":"Oslo"}'


def test_stream_ended_by_length_is_incomplete() -> None:
    s = ResponseStream("demo", echo(req()))
    ev = events([*s.feed(chunk("Hi", finish="length")), *s.feed(chunk(usage=(3, 1))),
                 *s.done()])
    assert ev[-1]["type"] == "response.incomplete"
    assert ev[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert ev[-1]["response"]["output"][0]["content"][0]["text"] == "Hi"


def test_stream_cut_midway_has_no_completed_and_ends_failed() -> None:
    """The upstream broke off inside a tool call: the caller gets an error event and
    response.failed with only what was complete, never response.completed."""
    s = ResponseStream("demo", echo(req()))
    raw = [*s.feed(chunk("partial")),
           *s.feed(chunk(calls=[{"index": 0, "id": "call_Z",
                                 "function": {"name": "f", "arguments": '{"a"'}}])),
           *s.error("server_error", "the upstream closed the connection")]
    ev = events(raw)
    types = [e["type"] for e in ev]
    assert "response.completed" not in types and types[-2:] == ["error", "response.failed"]
    assert ev[-2]["code"] == "server_error" and "upstream" in ev[-2]["message"]
    failed = ev[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error",
                               "message": "the upstream closed the connection"}
    # The text item was closed when the call began; the half-sent call is not in output.
    assert [o["type"] for o in failed["output"]] == ["message"]


def test_stream_cut_before_any_chunk_still_opens_the_response() -> None:
    ev = events(ResponseStream("demo", echo(req())).error("server_error", "deadline"))
    assert [e["type"] for e in ev] == ["response.created", "response.in_progress", "error",
                                       "response.failed"]


def test_stream_with_no_content_completes_with_an_empty_output() -> None:
    ev = events(ResponseStream("demo", echo(req())).done())
    assert [e["type"] for e in ev] == ["response.created", "response.in_progress",
                                       "response.completed"]
    assert ev[-1]["response"]["output"] == []


def test_call_ids_map_to_mistral_and_back_consistently_across_turns() -> None:
    """A conversation that moves to La Plateforme: the caller's call_ ids become the same
    9-character ids in every turn, and an answer's ids come back as the caller's."""
    turn = req(input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_LongLocalId_01", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_LongLocalId_01",
         "output": "sunny"}], tools=[TOOL])
    t = MistralTranslator()
    first = t.request("chat", request_to_chat(turn), "mistral-small", include_usage=True)
    msgs = first.body["messages"]
    mid = msgs[1]["tool_calls"][0]["id"]
    assert len(mid) == 9 and mid.isalnum() and msgs[2]["tool_call_id"] == mid
    later = t.request("chat", request_to_chat(turn), "mistral-small", include_usage=True)
    assert later.body["messages"][1]["tool_calls"][0]["id"] == mid
    answer = chat(None, [{"id": mid, "type": "function",
                          "function": {"name": "get_weather", "arguments": "{}"}}],
                  "tool_calls")
    t.response(first, answer)
    out = chat_to_response(answer, "demo", echo(turn))["output"]
    assert out[0]["call_id"] == "call_LongLocalId_01"


# Optional fields the translation does not read, or reads only in part, of a wrong type:
# refused as OpenAI refuses them, a 400 naming the field (param) with OpenAI's code.
@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"metadata": 5}, "metadata", "invalid_type"),
    ({"metadata": {"k": 1}}, "metadata.k", "invalid_type"),
    ({"service_tier": 3}, "service_tier", "invalid_value"),
    ({"text": {"format": {"type": "text"}, "verbosity": 2}}, "text.verbosity",
     "invalid_value"),
    ({"text": {"format": None}}, "text.format", "invalid_type"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_type"),
    ({"store": "no"}, "store", "invalid_type"),
    ({"user": 5}, "user", "invalid_type"),
    ({"safety_identifier": []}, "safety_identifier", "invalid_type"),
    ({"reasoning": "high"}, "reasoning", "invalid_type"),
    ({"include": "x"}, "include", "invalid_type"),
    ({"truncation": "middle"}, "truncation", "invalid_value"),
    ({"top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"max_tool_calls": "3"}, "max_tool_calls", "invalid_type"),
    ({"stream_options": 1}, "stream_options", "invalid_type"),
    ({"temperature": "1"}, "temperature", None),
    ({"tools": [{**TOOL, "strict": "yes"}]}, "tools[0].strict", "invalid_type"),
    ({"tools": [{**TOOL, "description": 5}]}, "tools[0].description", "invalid_type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {},
                          "strict": 1}}}, "text.format.strict", "invalid_type"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": 3}]}]},
     "input[0].content[0].detail", "invalid_value"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                 "id": 5}]}, "input[0].id", "invalid_type"),
    ({"bogus": 1}, "bogus", "unknown_parameter"),
    ({"messages": []}, "messages", "unknown_parameter"),
])
def test_a_wrong_typed_or_unknown_field_is_refused_naming_it(
        extra: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({**req(), **extra})
    err = info.value
    assert err.status == 400 and err.param == param and err.code == code, err.message
    assert f"'{param}'" in err.message, err.message
    if code == "unknown_parameter":
        assert err.message == f"Unknown parameter: '{param}'."


@pytest.mark.parametrize("documented", [
    {"store": False}, {"reasoning": {"effort": "low"}}, {"include": []},
    {"truncation": "disabled"}, {"service_tier": "auto"}, {"metadata": {"k": "v"}},
    {"prompt_cache_key": "k"}, {"top_logprobs": 0}, {"user": None},
    {"parallel_tool_calls": False}, {"text": {"verbosity": "low"}},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                "id": "fc_1", "status": "completed"}]},
])
def test_documented_fields_it_does_not_use_are_taken(documented: dict[str, Any]) -> None:
    assert request_to_chat({**req(), **documented})["model"] == "demo"


# OpenAI validates with pydantic too: an integral float is taken for an integer (as its
# lax mode does, and as JSON Schema counts it), a fraction refused.
@pytest.mark.parametrize(("field", "sent"), [("max_output_tokens", 30.0),
                                             ("top_logprobs", 3.0), ("max_tool_calls", 2.0)])
def test_an_integer_written_as_a_float_is_taken_as_the_integer(field: str,
                                                              sent: float) -> None:
    out = request_to_chat({**req(), field: sent})
    if field == "max_output_tokens":
        assert out["max_tokens"] == 30 and isinstance(out["max_tokens"], int)
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({**req(), field: sent + 0.5})
    assert info.value.param == field
    for wrong in (str(int(sent)), True):
        with pytest.raises(InvalidRequest):
            request_to_chat({**req(), field: wrong})
