"""The gateway end to end: real vLLM CPU engine, fake La Plateforme, the openai client."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Engine, Hosted, Router

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello"}]


def test_idle_engine_serves_locally(router: Router, plateforme: Hosted) -> None:
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8, extra_headers={"x-request-id": "e2e-1"})
    resp = raw.parse()
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.headers["x-spillover-backend"] == "demo-local"
    assert raw.headers["x-spillover-reason"] == "local-ok"
    assert raw.headers["x-request-id"] == "e2e-1"
    assert float(raw.headers["x-spillover-cost-usd"]) == 0.0
    assert resp.model == "demo"
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 8
    assert plateforme.fake.requests == []


def test_stream_local(router: Router, plateforme: Hosted) -> None:
    with router.client.chat.completions.with_streaming_response.create(
            model="demo", messages=HELLO, max_tokens=12, stream=True) as raw:
        assert raw.headers["x-spillover-route"] == "local"
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # The router asked vLLM for usage on its own account; the caller did not, so no chunk
    # carries it.
    assert all(c.usage is None for c in chunks)


def test_stream_usage_when_asked(router: Router) -> None:
    chunks = list(router.client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_completions_local_and_fim_hosted(router: Router, plateforme: Hosted) -> None:
    raw = router.client.completions.with_raw_response.create(
        model="code", prompt="def add(a, b):", max_tokens=6)
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.parse().choices[0].text is not None
    # vLLM does not do fill-in-the-middle: a suffix goes to Codestral on La Plateforme.
    raw = router.client.completions.with_raw_response.create(
        model="code", prompt="def add(a, b):", suffix="    return c", max_tokens=6)
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.headers["x-spillover-reason"] == "capability"
    assert raw.parse().choices[0].text
    sent = plateforme.fake.requests_to("/v1/fim/completions")
    assert sent[-1].body["suffix"] == "    return c"
    assert sent[-1].body["model"] == "codestral-latest"


def test_embeddings_hosted(router: Router) -> None:
    raw = router.client.embeddings.with_raw_response.create(model="embed", input=["a", "b"])
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.headers["x-spillover-reason"] == "hosted-only"
    assert len(raw.parse().data) == 2


def test_forced_hosted_translates_for_mistral(router: Router, plateforme: Hosted) -> None:
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8, seed=11, user="app-1",
        extra_headers={"x-spillover-route": "hosted"})
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.headers["x-spillover-backend"] == "mistral"
    assert raw.headers["x-spillover-reason"] == "forced"
    assert float(raw.headers["x-spillover-cost-usd"]) > 0
    body = plateforme.fake.requests_to("/v1/chat/completions")[-1].body
    assert body["random_seed"] == 11 and "seed" not in body and "user" not in body
    assert body["model"] == "mistral-small-latest"


def test_failover_before_first_byte(router: Router, plateforme: Hosted,
                                    backup: Hosted) -> None:
    # Each request tries La Plateforme twice (retry with backoff) before moving on; the
    # third consecutive failure opens its breaker, so the stream skips it at once.
    plateforme.fake.fail_next(4, 503)
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8,
        extra_headers={"x-spillover-route": "hosted"})
    assert raw.headers["x-spillover-backend"] == "backup"
    assert raw.headers["x-spillover-reason"] == "failover"
    assert raw.parse().choices[0].message.content
    with router.client.chat.completions.with_streaming_response.create(
            model="demo", messages=HELLO, max_tokens=8, stream=True,
            extra_headers={"x-spillover-route": "hosted"}) as s:
        assert s.headers["x-spillover-backend"] == "backup"
        assert "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices)
    assert len(backup.fake.requests) == 2


def test_hosted_429_everywhere_surfaces_retry_after(router: Router, plateforme: Hosted,
                                                     backup: Hosted) -> None:
    plateforme.fake.fail_next(1, 429, retry_after=3)
    backup.fake.fail_next(1, 429, retry_after=4)
    with pytest.raises(openai.RateLimitError) as info:
        router.client.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=8,
            extra_headers={"x-spillover-route": "hosted"})
    assert info.value.response.headers["retry-after"] in ("3", "4")


def test_stream_broken_after_first_byte_ends_with_error(make_router: Any,
                                                        plateforme: Hosted) -> None:
    router: Router = make_router(request_timeout_s=3)
    plateforme.fake.mode = "stall_mid_stream"
    stream = router.client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=8, stream=True,
        extra_headers={"x-spillover-route": "hosted"})
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "deadline" in str(info.value)


def _long_streams(router: Router, n: int, routes: list[str], stop: threading.Event,
                  started: threading.Semaphore, seqs: int = 4) -> list[threading.Thread]:
    """Long generations through the router, held open until `stop` is set.

    A warm engine writes a 1,800-token stream in a second or two, faster than a busy
    machine lets a test look at it. `seqs` sequences per request make each stream ~0.35 MB
    a sequence, and the reader is slow: the router relays at the reader's pace, so once
    a stream is larger than what the buffers on the way hold (the router's socket send
    buffer alone grows to 4 MB on loopback here), it stays in flight as long as the
    reader wants, as with a slow client over a real network; until then it lasts as long
    as the engine takes to generate it.
    """
    http = httpx.Client(timeout=60, transport=httpx.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]))
    client = router.client.with_options(http_client=http)

    def one() -> None:
        with client.chat.completions.with_streaming_response.create(
                model="demo", messages=HELLO, max_tokens=1800, n=seqs, stream=True,
                extra_body={"ignore_eos": True}) as s:
            routes.append(s.headers["x-spillover-route"])
            started.release()
            for _ in s.iter_lines():
                if stop.is_set():
                    return  # closing the stream makes the router cancel the upstream
                time.sleep(0.01)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_saturated_engine_spills_then_returns(make_router: Any, plateforme: Hosted) -> None:
    router: Router = make_router(max_inflight=4)
    stop, started = threading.Event(), threading.Semaphore(0)
    routes: list[str] = []
    threads = _long_streams(router, 4, routes, stop, started)
    try:
        for _ in range(4):
            assert started.acquire(timeout=60)
        assert routes == ["local"] * 4
        status = router.get("/readyz").json()["engines"]["demo-local"]
        assert status["saturated"] and status["inflight"] == 4, json.dumps(status)
        raw = router.client.chat.completions.with_raw_response.create(
            model="demo", messages=HELLO, max_tokens=8)
        assert raw.headers["x-spillover-route"] == "hosted"
        assert raw.headers["x-spillover-reason"] == "local-saturated"
        assert len(plateforme.fake.requests_to("/v1/chat/completions")) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    router.wait_for(lambda s: not s["engines"]["demo-local"]["saturated"], 60,
                    "the load to drain")
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.headers["x-spillover-reason"] == "local-ok"


@pytest.mark.stops_engine
def test_stopped_engine_goes_hosted(engine: Engine, router: Router,
                                    plateforme: Hosted) -> None:
    engine.stop()
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.headers["x-spillover-reason"] == "local-down"
    with router.client.chat.completions.with_streaming_response.create(
            model="demo", messages=HELLO, max_tokens=8, stream=True) as s:
        assert s.headers["x-spillover-route"] == "hosted"
        list(s.parse())
    status = router.wait_for(lambda s: not s["engines"]["demo-local"]["healthy"], 5,
                             "the monitor to see the engine down")
    assert status["ready"] is True  # hosted still serves every alias


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
                       "required": ["city"]},
    },
}


def test_tool_conversation_starts_local_continues_hosted(router: Router,
                                                         plateforme: Hosted) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert raw.headers["x-spillover-route"] == "local"
    msg = raw.parse().choices[0].message
    assert msg.tool_calls, msg
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments.replace(" ", "") in ('{"city":"Paris"}', '{"city":"Lyon"}')
    # The app answers the call with an OpenAI-style id of its own choosing: the next turn
    # must still work on La Plateforme, which only takes 9-character ids.
    app_id = "call_" + call.id + "_from_app"
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": app_id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": app_id, "content": "18 degrees, sunny"},
    ]
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, tools=[WEATHER_TOOL], max_tokens=32,
        extra_headers={"x-spillover-route": "hosted"})
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.parse().choices[0].message.content
    sent = plateforme.fake.requests_to("/v1/chat/completions")[-1].body
    sent_id = sent["messages"][1]["tool_calls"][0]["id"]
    assert len(sent_id) == 9 and sent_id.isalnum()
    assert sent["messages"][2]["tool_call_id"] == sent_id
    # The same conversation continues locally too: the Mistral template wants 9 characters.
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, tools=[WEATHER_TOOL], max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local", dict(raw.headers)


def test_streamed_tool_call_local(router: Router) -> None:
    chunks = list(router.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL], temperature=0, max_tokens=96, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    args = "".join((tc.function.arguments or "") for tc in calls if tc.function)
    assert '"city"' in args
