"""Local engines' own Messages and Responses endpoints (issue 15): a stand-in vLLM that has
or lacks `/v1/messages` and `/v1/responses`; the router asks it (GET: 405 there, 404 not),
sends those callers natively where it has them, translates to chat where it does not, and
falls back to chat, unseen by the caller, when a native POST finds no route."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from router.app import Settings, create_app
from router.providers.tool_ids import mistral_tool_id
from router.providers.vllm_native import messages_unsuited, responses_unsuited
from router.routing.engine_apis import EngineApis, missing_route, probe_verdict
from router.runtime import Runtime
from tests.unit.helpers import (
    BASE_YAML,
    ENV,
    LOCAL,
    World,
    call_then_leave,
    chunk,
    config,
    lifespan_client,
    sse,
    tool_calling_hosted,
)
from tests.unit.test_stream_cleanup import ledger_rows

SERVED = "demo-served"  # the engine's name for the model; callers say "demo"
MSG: dict[str, Any] = {"model": "demo", "max_tokens": 16, "system": "Be brief.",
                       "messages": [{"role": "user", "content": "hello"}]}
RESP: dict[str, Any] = {"model": "demo", "input": "hello", "instructions": "Be brief.",
                        "max_output_tokens": 16}
ANTHROPIC = {"anthropic-version": "2023-06-01"}
NOT_FOUND = {"detail": "Not Found"}


def message(usage: tuple[int, int] = (12, 5)) -> dict[str, Any]:
    return {"id": "chatcmpl-9eaaa81c893084f9", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": "native hello"}], "model": SERVED,
            "stop_reason": "end_turn", "usage": {"input_tokens": usage[0],
                                                 "output_tokens": usage[1]}}


def response(usage: tuple[int, int] = (13, 4)) -> dict[str, Any]:
    return {"id": "resp_900842614abe4ef1", "object": "response", "model": SERVED,
            "status": "completed", "created_at": 1,
            "output": [{"id": "msg_1", "type": "message", "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": "native hi",
                                     "annotations": []}]}],
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1],
                      "total_tokens": sum(usage)}}


def ev(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def message_events(n: int = 3, usage: tuple[int, int] = (12, 3)) -> list[bytes]:
    """vLLM 0.32's Messages stream, as measured on the demo model."""
    start = message((usage[0], 0))
    start["content"], start["stop_reason"] = [], None
    out = [ev("message_start", {"type": "message_start", "message": start}),
           ev("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})]
    out += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": f"t{i}"}})
            for i in range(n)]
    out += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                 "usage": {"input_tokens": usage[0],
                                           "output_tokens": usage[1]}}),
            ev("message_stop", {"type": "message_stop"})]
    return out


def response_events(usage: tuple[int, int] = (13, 2)) -> list[bytes]:
    """vLLM 0.32's Responses stream, shortened."""
    r = response(usage)
    pending = {**r, "status": "in_progress", "output": [], "usage": None}
    return [ev("response.created", {"type": "response.created", "sequence_number": 0,
                                     "response": pending}),
            ev("response.output_text.delta", {"type": "response.output_text.delta",
                                              "sequence_number": 1, "delta": "native",
                                              "item_id": "msg_1", "output_index": 0,
                                              "content_index": 0}),
            ev("response.output_text.delta", {"type": "response.output_text.delta",
                                              "sequence_number": 2, "delta": " hi",
                                              "item_id": "msg_1", "output_index": 0,
                                              "content_index": 0}),
            ev("response.completed", {"type": "response.completed", "sequence_number": 3,
                                      "response": r})]


class Trickle(httpx.AsyncByteStream):
    """A stream body that comes one event a read, as an engine's does."""

    def __init__(self, events: list[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for e in self._events:
            yield e
            await asyncio.sleep(0)


@dataclass
class Engine:
    """A stand-in vLLM in front of `world` (which answers chat, /health and /metrics):
    `messages`/`responses` say whether it serves those APIs; `routed` whether its POST
    routes are really there (False: the probe says yes, the POST finds nothing)."""

    world: World
    messages: bool = True
    responses: bool = True
    routed: bool = True
    stream_events: list[bytes] | None = None
    native: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def handle(self, req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if str(req.url).startswith(LOCAL) and path == "/v1/messages/count_tokens":
            self.native.append((req.method, path, json.loads(req.content)))
            if not (self.messages and self.routed):
                return httpx.Response(404, json=NOT_FOUND)
            return httpx.Response(200, json={"input_tokens": 77})
        if str(req.url).startswith(LOCAL) and path in ("/v1/messages", "/v1/responses"):
            has = self.messages if path == "/v1/messages" else self.responses
            if req.method == "GET":
                return (httpx.Response(405, json={"detail": "Method Not Allowed"}) if has
                        else httpx.Response(404, json=NOT_FOUND))
            body = json.loads(req.content)
            self.native.append((req.method, path, body))
            if not (has and self.routed):
                return httpx.Response(404, json=NOT_FOUND)
            if body.get("stream"):
                events = self.stream_events or (message_events() if path == "/v1/messages"
                                                else response_events())
                return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                      stream=Trickle(events))
            return httpx.Response(200, json=message() if path == "/v1/messages"
                                  else response())
        return self.world.transport().handle_request(req)

    def posts(self, path: str) -> list[dict[str, Any]]:
        return [b for m, p, b in self.native if m == "POST" and p == path]


def served_config(scheduling: str | None = None) -> Any:
    data = yaml.safe_load(BASE_YAML)
    local = data["aliases"]["demo"]["local"][0]
    local["served_model_name"] = SERVED
    if scheduling is not None:
        local["scheduling_policy"] = scheduling
    return config(yaml.safe_dump(data))


@contextlib.asynccontextmanager
async def running(engine: Engine, scheduling: str | None = None,
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    app = create_app(Settings(env=dict(ENV)), config=served_config(scheduling),
                     transport=httpx.MockTransport(engine.handle))
    async with lifespan_client(app) as c:
        yield c, app.state.runtime


def apis(rt: Runtime) -> dict[str, Any]:
    status = rt.monitor.status()["demo-local"]["apis"]
    assert isinstance(status, dict)
    return status


# -- the decision follows the engine's answers ---------------------------------------

def test_probe_verdicts_and_missing_routes() -> None:
    assert probe_verdict(405) is True  # a POST-only route is there
    assert probe_verdict(404) is False
    assert probe_verdict(200) is None and probe_verdict(503) is None  # says nothing
    assert missing_route(404, b'{"detail":"Not Found"}')
    assert missing_route(405, b'{"detail":"Method Not Allowed"}')
    # vLLM's 404 for an unknown model is an error of the API's own: the route is there.
    assert not missing_route(404, b'{"type":"error","error":{"type":"NotFoundError"}}')
    assert not missing_route(400, b'{"detail":"Not Found"}')


async def test_probes_recheck_and_forget() -> None:
    now = [0.0]
    answers = {"/v1/messages": 405, "/v1/responses": 404}
    seen: list[str] = []

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(f"{req.method} {req.url.path}")
        return httpx.Response(answers[req.url.path])

    known = EngineApis(recheck_s=60, clock=lambda: now[0])
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        assert not known.has("e", "messages") and known.due("e")  # unknown counts as no
        await known.probe(client, "e", "http://e/v1", httpx.Timeout(1))
        assert seen == ["GET /v1/messages", "GET /v1/responses"]
        assert known.has("e", "messages") and not known.has("e", "responses")
        assert known.status("e")["messages"] == {"native": True, "age_s": 0.0,
                                                 "how": "GET /v1/messages answered 405"}
        assert not known.due("e")
        now[0] = 61.0
        assert known.due("e")  # the periodic re-check
        answers["/v1/messages"] = 503  # an answer that says nothing keeps what was known
        await known.probe(client, "e", "http://e/v1", httpx.Timeout(1))
        assert known.has("e", "messages")
        answers["/v1/messages"] = 404  # restarted without it
        known.recheck("e")
        assert known.due("e")
        await known.probe(client, "e", "http://e/v1", httpx.Timeout(1))
        assert not known.has("e", "messages")
    known.forget(["e"])
    assert known.status("e")["messages"] == {"native": False, "how": "not learnt yet",
                                             "age_s": None}


def test_what_stays_translated() -> None:
    assert messages_unsuited(MSG) is None
    tool_turn = {**MSG, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                      "content": "ok"}]}]}
    assert messages_unsuited(tool_turn) is None
    tool_turn["messages"][1]["content"][0]["is_error"] = True
    assert messages_unsuited(tool_turn) == "a tool_result with is_error"
    image = {"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "http://x/y.png"}}]}
    assert messages_unsuited({**MSG, "messages": [image]}) == "image blocks"
    assert responses_unsuited(RESP) is None
    assert responses_unsuited({**RESP, "tools": [{"type": "function", "name": "f"}]})
    assert responses_unsuited({**RESP, "text": {"format": {"type": "json_object"}}}) is None
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
    assert responses_unsuited({**RESP, "input": [image]}) == "message parts other than text"
    assert responses_unsuited({**RESP, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {}}}}) is None
    assert responses_unsuited({**RESP, "input": [
        {"type": "function_call_output", "call_id": "c", "output": "x"}]})


# -- Messages --------------------------------------------------------------------------

async def test_messages_go_to_an_engine_that_has_them() -> None:
    engine = Engine(World())
    async with running(engine) as (c, rt):
        assert apis(rt)["messages"]["native"] is True
        assert apis(rt)["messages"]["how"] == "GET /v1/messages answered 405"
        # vLLM's own `priority` is no Messages field: refused as Anthropic refuses an
        # unknown one, so a caller cannot set its own engine priority this way.
        r = await c.post("/v1/messages", json={**MSG, "thinking": {"type": "enabled"},
                                               "priority": -5}, headers=ANTHROPIC)
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "priority: Extra inputs are not permitted"), r.text
        assert engine.posts("/v1/messages") == []
        r = await c.post("/v1/messages", json={**MSG, "thinking": {"type": "enabled"}},
                         headers=ANTHROPIC)
        assert r.status_code == 200, r.text
        assert r.headers["x-spillover-route"] == "local"
        assert r.headers["x-spillover-upstream-api"] == "messages"
        got = r.json()
        # The engine's Message, named as the translation would name it.
        assert got["model"] == "demo" and got["id"] == "msg_9eaaa81c893084f9"
        assert got["content"] == [{"type": "text", "text": "native hello"}]
        (sent,) = engine.posts("/v1/messages")
        # As the caller wrote it, but for the engine's model name, less what the
        # translation drops too (thinking).
        assert sent == {**MSG, "model": SERVED}
        assert engine.world.bodies("local") == []  # no chat request
        (row,) = await ledger_rows(rt, 1)
        assert (row.endpoint, row.route, row.status) == ("messages", "local", 200)
        assert (row.prompt_tokens, row.completion_tokens) == (12, 5)
        # /status's recent calls (and the access log) say which API the call used.
        (recent,) = (await c.get("/status")).json()["recent"]
        assert (recent["endpoint"], recent["upstream_api"]) == ("messages", "messages")


async def test_messages_stream_relayed_natively_and_booked_from_its_usage() -> None:
    engine = Engine(World())
    async with running(engine) as (c, rt):
        r = await c.post("/v1/messages", json={**MSG, "stream": True}, headers=ANTHROPIC)
        assert r.status_code == 200 and r.headers["x-spillover-upstream-api"] == "messages"
        events = [e for e in r.content.split(b"\n\n") if e]
        names = [e.split(b"\n")[0] for e in events]
        assert names[0] == b"event: message_start" and names[-1] == b"event: message_stop"
        start = json.loads(events[0].split(b"data: ", 1)[1])
        assert start["message"]["model"] == "demo"
        assert start["message"]["id"] == "msg_9eaaa81c893084f9"
        # Every other event exactly as the engine sent it.
        assert [e + b"\n\n" for e in events[1:]] == message_events()[1:]
        (row,) = await ledger_rows(rt, 1)
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 12, 3)
        assert engine.posts("/v1/messages")[0]["stream"] is True


async def test_messages_to_an_engine_without_them_are_translated() -> None:
    engine = Engine(World(), messages=False)
    async with running(engine) as (c, rt):
        assert apis(rt)["messages"] == {"native": False, "age_s": apis(rt)["messages"]["age_s"],
                                        "how": "GET /v1/messages answered 404"}
        r = await c.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        assert r.status_code == 200 and r.headers["x-spillover-upstream-api"] == "chat"
        assert r.json()["content"] == [{"type": "text", "text": "local answer"}]
        assert engine.posts("/v1/messages") == []
        assert rt.recorder.recent[0]["upstream_api"] == "chat"
        (chat,) = engine.world.bodies("local")
        assert chat["model"] == SERVED and chat["messages"][0]["role"] == "system"


async def test_a_404_on_the_native_route_falls_back_unseen_and_is_remembered() -> None:
    engine = Engine(World(), routed=False)  # the probe says yes, the route is not there
    async with running(engine) as (c, rt):
        assert apis(rt)["messages"]["native"] is True
        r = await c.post("/v1/messages", json=MSG, headers=ANTHROPIC)
        assert r.status_code == 200, r.text  # the caller never sees the 404
        assert r.headers["x-spillover-upstream-api"] == "chat"
        assert r.json()["content"] == [{"type": "text", "text": "local answer"}]
        assert apis(rt)["messages"]["native"] is False
        assert apis(rt)["messages"]["how"] == "POST /v1/messages answered 404"
        r = await c.post("/v1/messages", json={**MSG, "stream": False}, headers=ANTHROPIC)
        assert r.status_code == 200
        assert len(engine.posts("/v1/messages")) == 1  # not asked again
        assert len(engine.world.bodies("local")) == 2
        rows = await ledger_rows(rt, 2)
        assert [(x.status, x.prompt_tokens, x.completion_tokens) for x in rows] == \
            [(200, 10, 5), (200, 10, 5)]  # one row each, the chat answer's usage


async def test_a_class_vllm_messages_cannot_carry_goes_translated_with_its_priority() -> None:
    engine = Engine(World())
    async with running(engine, scheduling="priority") as (c, _):
        r = await c.post("/v1/messages", json=MSG,
                         headers={**ANTHROPIC, "x-spillover-priority": "batch"})
        assert r.status_code == 200 and r.headers["x-spillover-upstream-api"] == "chat"
        assert engine.world.bodies("local")[-1]["priority"] == 2
        r = await c.post("/v1/messages", json=MSG,
                         headers={**ANTHROPIC, "x-spillover-priority": "interactive"})
        assert r.headers["x-spillover-upstream-api"] == "messages"  # vLLM's default: 0


async def test_tool_ids_stay_consistent_from_the_native_engine_to_la_plateforme() -> None:
    engine = Engine(World())
    answered: list[str] = []
    engine.world.hosted = tool_calling_hosted(answered)
    use: dict[str, Any] = {"type": "tool_use", "id": "N40EjNMuS", "name": "get_weather",
           "input": {"city": "Paris"}}  # what vLLM's native endpoint gave (measured)
    claude: dict[str, Any] = {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
              "name": "get_weather", "input": {"city": "Lyon"}}
    turns = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": [use, claude]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": use["id"], "content": "18"},
                 {"type": "tool_result", "tool_use_id": claude["id"], "content": "20"}]}]
    body = {**MSG, "messages": turns}
    async with running(engine) as (c, _):
        r = await c.post("/v1/messages", json=body, headers=ANTHROPIC)
        assert r.headers["x-spillover-upstream-api"] == "messages"
        sent = engine.posts("/v1/messages")[-1]["messages"]
        mapped = mistral_tool_id(claude["id"])
        assert [b["id"] for b in sent[1]["content"]] == ["N40EjNMuS", mapped]
        assert [b["tool_use_id"] for b in sent[2]["content"]] == ["N40EjNMuS", mapped]
        # The same conversation, next turn on La Plateforme: the same 9-character ids.
        r = await c.post("/v1/messages", json=body,
                         headers={**ANTHROPIC, "x-spillover-route": "hosted"})
        assert r.status_code == 200, r.text
        assert answered == ["N40EjNMuS", mapped]


async def test_caller_gone_mid_native_stream_is_booked_like_a_chat_stream() -> None:
    engine = Engine(World(), stream_events=message_events(n=40, usage=(12, 40)))
    app = create_app(Settings(env=dict(ENV)), config=served_config(),
                     transport=httpx.MockTransport(engine.handle))
    runtime: Runtime = app.state.runtime
    body = json.dumps({**MSG, "stream": True, "max_tokens": 64}).encode()
    async with app.router.lifespan_context(app):
        sent = await call_then_leave(app, "/v1/messages", body, after=6,
                                     headers=((b"anthropic-version", b"2023-06-01"),))
        assert dict(sent[0]["headers"])[b"x-spillover-upstream-api"] == b"messages"
        (row,) = await ledger_rows(runtime, 1)
        assert (row.endpoint, row.route, row.status) == ("messages", "local", 499)
        # As for a cut chat stream: the prompt's upper bound, a token per relayed delta
        # (not message_start's 0 output tokens).
        assert row.prompt_tokens > 0 and 1 <= row.completion_tokens < 40
        assert all(e["inflight"] == 0 for e in runtime.monitor.status().values())


# -- Responses -------------------------------------------------------------------------

async def test_responses_go_to_an_engine_that_has_them_stateless() -> None:
    engine = Engine(World())
    async with running(engine, scheduling="priority") as (c, rt):
        assert apis(rt)["responses"]["native"] is True
        r = await c.post("/v1/responses", json={**RESP, "store": True, "reasoning": {}},
                         headers={"x-spillover-priority": "standard"})
        assert r.status_code == 200, r.text
        assert r.headers["x-spillover-upstream-api"] == "responses"
        got = r.json()
        assert got["model"] == "demo" and got["output"][0]["content"][0]["text"] == "native hi"
        (sent,) = engine.posts("/v1/responses")
        assert sent == {**RESP, "model": SERVED, "store": False, "priority": 1}
        (row,) = await ledger_rows(rt, 1)
        assert (row.endpoint, row.prompt_tokens, row.completion_tokens) == ("responses", 13, 4)

        r = await c.post("/v1/responses", json={**RESP, "stream": True})
        assert r.headers["x-spillover-upstream-api"] == "responses"
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[0].startswith(b"event: response.created")
        assert json.loads(events[0].split(b"data: ", 1)[1])["response"]["model"] == "demo"
        assert json.loads(events[-1].split(b"data: ", 1)[1])["response"]["model"] == "demo"
        assert [e + b"\n\n" for e in events[1:3]] == response_events()[1:3]
        rows = await ledger_rows(rt, 2)
        assert (rows[-1].status, rows[-1].prompt_tokens, rows[-1].completion_tokens) == \
            (200, 13, 2)


async def test_responses_refusals_and_tools_stay_as_they_were() -> None:
    engine = Engine(World())
    async with running(engine) as (c, _):
        r = await c.post("/v1/responses", json={**RESP, "previous_response_id": "resp_1"})
        assert r.status_code == 400 and "stateless" in r.json()["error"]["message"]
        r = await c.post("/v1/responses", json={**RESP, "tools": [
            {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
        assert r.status_code == 200 and r.headers["x-spillover-upstream-api"] == "chat"
        assert engine.posts("/v1/responses") == []


async def test_responses_without_the_endpoint_and_a_404_fallback() -> None:
    engine = Engine(World(), responses=False)
    async with running(engine) as (c, rt):
        assert apis(rt)["responses"]["native"] is False
        r = await c.post("/v1/responses", json=RESP)
        assert r.headers["x-spillover-upstream-api"] == "chat"
        assert r.json()["output"][0]["content"][0]["text"] == "local answer"
    engine = Engine(World(), routed=False)
    engine.world.local = lambda req: httpx.Response(
        200, headers={"content-type": "text/event-stream"},
        content=sse([chunk(SERVED, "chat"), chunk(SERVED, None, usage=(5, 1))]))
    async with running(engine) as (c, rt):
        r = await c.post("/v1/responses", json={**RESP, "stream": True})
        assert r.status_code == 200 and b"response.completed" in r.content
        assert r.headers["x-spillover-upstream-api"] == "chat"
        assert apis(rt)["responses"]["native"] is False


@pytest.mark.parametrize("path", ["/status"])
async def test_status_and_explain_show_what_each_engine_serves(path: str) -> None:
    engine = Engine(World(), responses=False)
    async with running(engine) as (c, _):
        status = (await c.get(path)).json()
        found = json.dumps(status)
        assert '"how": "GET /v1/messages answered 405"' in found
        assert '"how": "GET /v1/responses answered 404"' in found
        explained = (await c.post("/v1/route/explain", json={
            "model": "demo", "messages": [{"role": "user", "content": "x"}]})).json()
        load = explained["load"]["demo-local"]["apis"]
        assert load["messages"]["native"] is True and load["responses"]["native"] is False


# -- replicas: each is asked on its own ------------------------------------------------

async def test_each_replica_is_asked_and_served_by_what_it_answered() -> None:
    from tests.unit.test_replicas import YAML, Fleet

    fleet = Fleet()
    served: list[tuple[str, str]] = []
    plain = fleet.transport()

    def handle(req: httpx.Request) -> httpx.Response:
        host, path = req.url.host, req.url.path
        if path in ("/v1/messages", "/v1/responses") and host.startswith("10.0.0."):
            has = host == "10.0.0.1" and path == "/v1/messages"  # one replica has it
            if req.method == "GET":
                return httpx.Response(405 if has else 404)
            served.append((host, "messages"))
            return (httpx.Response(200, json=message()) if has
                    else httpx.Response(404, json=NOT_FOUND))
        if path == "/v1/chat/completions" and host.startswith("10.0.0."):
            served.append((host, "chat"))
        return plain.handler(req)  # type: ignore[return-value]

    app = create_app(Settings(env=dict(ENV)), config=config(YAML),
                     transport=httpx.MockTransport(handle), resolver=fleet.resolve)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        status = app.state.runtime.monitor.status()
        assert status["small@10.0.0.1:8102"]["apis"]["messages"]["native"] is True
        assert status["small@10.0.0.2:8102"]["apis"]["messages"]["native"] is False
        for i in range(8):  # conversations spread over both replicas
            r = await c.post("/v1/messages", headers=ANTHROPIC, json={
                **MSG, "model": "small",
                "messages": [{"role": "user", "content": f"conversation {i}"}]})
            assert r.status_code == 200, r.text
            host = served[-1][0]
            assert r.headers["x-spillover-upstream-api"] == (
                "messages" if host == "10.0.0.1" else "chat")
    assert {h for h, _ in served} == {"10.0.0.1", "10.0.0.2"}
    # Only the replica that has it was ever sent a native request.
    assert {h for h, api in served if api == "messages"} == {"10.0.0.1"}


async def test_a_tier_the_cascade_may_resend_is_asked_in_chat() -> None:
    """The cascade reads a tier's answer as a chat completion: a local tier's Messages call
    it may re-send one tier up is not sent natively."""
    from tests.unit.test_tiers_gateway import KEYS, tiered_config

    engine = Engine(World())
    app = create_app(Settings(env=dict(ENV)), config=tiered_config(),
                     transport=httpx.MockTransport(engine.handle))
    async with lifespan_client(app) as c:
        r = await c.post("/v1/messages", json={**MSG, "model": "auto"},
                         headers={**ANTHROPIC, "x-api-key": KEYS["app"]})
        assert r.status_code == 200, r.text
        assert r.headers["x-spillover-tier"] == "demo"
        assert r.headers["x-spillover-upstream-api"] == "chat"
        assert engine.posts("/v1/messages") == []
        r = await c.post("/v1/messages", json={**MSG, "model": "demo"},
                         headers={**ANTHROPIC, "x-api-key": KEYS["app"]})
        assert r.headers["x-spillover-upstream-api"] == "messages"  # the plain alias


async def test_count_tokens_asks_the_endpoint_the_create_would_use() -> None:
    """A native create's prompt is vLLM's own conversion of the Messages request, not the
    chat path's: the count comes from the same place."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    body = {"model": "demo", "tools": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x",
                                           "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                      "content": "18"}]}]}
    engine = Engine(World())
    async with running(engine) as (c, _):
        r = await c.post("/v1/messages/count_tokens", json=body, headers=ANTHROPIC)
        assert r.status_code == 200, r.text
        assert r.headers["x-spillover-token-count"] == "engine"
        assert r.json() == {"input_tokens": 77}
        (sent,) = engine.posts("/v1/messages/count_tokens")
        mapped = mistral_tool_id("toolu_x")
        assert sent["model"] == SERVED and sent["tools"] == tools
        assert sent["messages"][1]["content"][0]["id"] == mapped
        assert sent["messages"][2]["content"][0]["tool_use_id"] == mapped
    engine = Engine(World(), messages=False)
    async with running(engine) as (c, _):
        r = await c.post("/v1/messages/count_tokens", json=body, headers=ANTHROPIC)
        assert r.status_code == 200
        assert engine.posts("/v1/messages/count_tokens") == []
        assert [p for _, p, _ in engine.world.seen] == ["/tokenize"]  # the chat path's
