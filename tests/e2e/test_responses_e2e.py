"""OpenAI's Responses API end to end: the `openai` SDK's responses.create and its stream as
the caller, the real vLLM CPU engine locally, the fake La Plateforme when forced hosted;
ledger rows against what the client received."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from router.accounting.ledger import Ledger, LedgerRow
from tests.e2e.conftest import Engine, Hosted, Router

pytestmark = pytest.mark.e2e

HOSTED = {"x-spillover-route": "hosted"}
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                "strict": True,
                "parameters": {"type": "object", "additionalProperties": False,
                               "properties": {"city": {"type": "string",
                                                       "enum": ["Paris", "Lyon"]}},
                               "required": ["city"]}}


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused-in-open-mode",
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
    raw = c.responses.with_raw_response.create(model="demo", input="Say hello",
                                               instructions="Be brief.",
                                               max_output_tokens=8, extra_headers=headers)
    resp = raw.parse()
    assert raw.headers["x-spillover-route"] == route
    assert resp.object == "response" and resp.model == "demo"
    assert resp.status in ("completed", "incomplete")
    assert resp.output and resp.output[0].type == "message"
    assert resp.output_text
    assert resp.usage is not None
    r = row(router, raw.headers["x-request-id"])
    assert r.endpoint == "responses" and r.route == route
    assert (r.prompt_tokens, r.completion_tokens) == (resp.usage.input_tokens,
                                                      resp.usage.output_tokens)
    assert 1 <= resp.usage.output_tokens <= 8

    # The SDK's stream helper accumulates the events into a snapshot and raises on any
    # that does not fit (an index before its item, a changed identity...).
    rid = f"e2e-responses-stream-{route}-{time.monotonic_ns()}"  # the caller's id
    with c.responses.stream(model="demo", input="Say hello", max_output_tokens=10,
                            extra_headers={**headers, "x-request-id": rid}) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    final = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events
                   if e.type == "response.output_text.delta")
    assert final.output_text == text
    assert final.usage is not None and final.usage.output_tokens >= 1
    r = row(router, rid)
    assert r.endpoint == "responses" and r.status == 200 and r.route == route
    assert (r.prompt_tokens, r.completion_tokens) == (final.usage.input_tokens,
                                                      final.usage.output_tokens)


def test_function_call_then_its_output_on_la_plateforme(router: Router,
                                                        plateforme: Hosted) -> None:
    c = client(router)
    first = c.responses.create(model="demo", input="What is the weather in Paris?",
                               tools=[WEATHER], max_output_tokens=96, temperature=0,
                               tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls, first
    call = calls[0]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) in ({"city": "Paris"}, {"city": "Lyon"})
    history: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id,
         "output": "18 degrees, sunny"}]
    second = c.responses.create(model="demo", input=history, tools=[WEATHER],
                                max_output_tokens=16, extra_headers=HOSTED)
    assert second.output
    sent = plateforme.fake.requests_to("/v1/chat/completions")[-1].body
    sent_id = sent["messages"][1]["tool_calls"][0]["id"]
    assert len(sent_id) == 9 and sent_id.isalnum()
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": sent_id,
                                   "content": "18 degrees, sunny"}


def test_refusals_raise_the_sdks_own_exceptions(router: Router) -> None:
    c = client(router)
    with pytest.raises(openai.BadRequestError) as bad:
        c.responses.create(model="demo", input="hi", previous_response_id="resp_123")
    assert "stateless" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as tool:
        c.responses.create(model="demo", input="hi", tools=[{"type": "web_search"}])
    assert "built-in tools" in str(tool.value)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no-such-model", input="hi")


# -- issue 15: the engine's own /v1/responses -----------------------------------------

def test_served_by_the_engines_own_responses_endpoint(router: Router, engine: Engine) -> None:
    router.wait_for(lambda s: s["engines"]["demo-local"]["apis"]["responses"]["native"], 10,
                    "the engine's responses API probed")
    c = client(router)
    log = engine.process.log_path
    before = log.read_text(errors="replace").count('"POST /v1/responses HTTP/1.1" 200')
    raw = c.responses.with_raw_response.create(model="demo", input="Say hello",
                                               instructions="Be brief.",
                                               max_output_tokens=8)
    resp = raw.parse()
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.headers["x-spillover-upstream-api"] == "responses"
    assert resp.object == "response" and resp.model == "demo" and resp.output_text
    assert resp.usage is not None
    r = row(router, raw.headers["x-request-id"])
    assert (r.endpoint, r.status) == ("responses", 200)
    assert (r.prompt_tokens, r.completion_tokens) == (resp.usage.input_tokens,
                                                      resp.usage.output_tokens)
    rid = f"e2e-responses-native-{time.monotonic_ns()}"
    with c.responses.stream(model="demo", input="Say hello", max_output_tokens=10,
                            extra_headers={"x-request-id": rid}) as stream:
        events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert final.model == "demo" and final.usage is not None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text
    r = row(router, rid)
    assert (r.status, r.prompt_tokens, r.completion_tokens) == (
        200, final.usage.input_tokens, final.usage.output_tokens)
    # The engine's own log: both went to its /v1/responses.
    after = log.read_text(errors="replace").count('"POST /v1/responses HTTP/1.1" 200')
    assert after == before + 2
    # Function tools stay translated (vLLM 0.32's /v1/responses did not follow a named
    # tool_choice on this model): the call still comes back as a function_call.
    raw = c.responses.with_raw_response.create(
        model="demo", input="What is the weather in Paris?", tools=[WEATHER],
        max_output_tokens=96, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"})
    assert raw.headers["x-spillover-upstream-api"] == "chat"
    assert any(o.type == "function_call" for o in raw.parse().output)
