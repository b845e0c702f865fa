"""OpenTelemetry traces through the ASGI app, spans caught by the SDK's in-memory
exporter: the request span, one child per upstream attempt, traceparent both ways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router.app import Settings, create_app
from router.routing.tracing import Tracing, enabled
from tests.unit.helpers import (
    CHAT,
    ENV,
    World,
    call_then_leave,
    chunk,
    completion,
    config,
    lifespan_client,
    sse,
)

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def client(world: World, exporter: InMemorySpanExporter
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(env=dict(ENV)), config=config(), transport=world.transport(),
                     tracing=Tracing(SimpleSpanProcessor(exporter)))
    async with lifespan_client(app) as c:
        yield c


async def test_a_failover_gives_a_request_span_and_one_span_per_attempt(
        client: httpx.AsyncClient, world: World, exporter: InMemorySpanExporter) -> None:
    seen: list[httpx.Headers] = []

    def hosted(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers)
        return httpx.Response(200, json=completion("mistral-small-latest", "hosted",
                                                   usage=(40, 8)))

    world.local_up = False  # the engine refuses the connection: the request fails over
    world.hosted = hosted
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 16},
                          headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-route"] == "hosted"
    spans = exporter.get_finished_spans()
    assert len(spans) == 3, [s.name for s in spans]
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    local, remote = sorted((s for s in spans if s.kind == SpanKind.CLIENT),
                           key=lambda s: s.start_time or 0)
    assert request.name == "chat demo"
    assert (local.name, remote.name) == ("chat demo", "chat mistral-small-latest")

    # The request span continues the caller's trace and carries the decision.
    assert request.kind == SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == CALLER_TRACE
    assert request.parent is not None and f"{request.parent.span_id:016x}" == CALLER_SPAN
    attrs = dict(request.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "demo"
    assert attrs["gen_ai.response.model"] == "mistral-small-latest"
    assert attrs["gen_ai.request.max_tokens"] == 16
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (40, 8)
    assert attrs["spillover.route"] == "hosted" and attrs["spillover.backend"] == "mistral"
    assert attrs["spillover.reason"] == r.headers["x-spillover-reason"]
    assert attrs["spillover.attempts"] == 2 and attrs["http.response.status_code"] == 200
    assert attrs["spillover.cost_usd"] == pytest.approx(40 * 0.1e-6 + 8 * 0.3e-6)
    assert attrs["spillover.request_id"] == r.headers["x-request-id"]
    assert request.status.status_code != StatusCode.ERROR

    # Each attempt is a CLIENT child of the request span: the failed one says why.
    for child in (local, remote):
        assert child.kind == SpanKind.CLIENT
        assert child.parent is not None and child.parent.span_id == request.context.span_id
    la, ra = dict(local.attributes or {}), dict(remote.attributes or {})
    assert la["gen_ai.provider.name"] == "vllm" and la["spillover.route"] == "local"
    assert la["server.address"] == "127.0.0.1" and la["server.port"] == 8101
    assert local.status.status_code == StatusCode.ERROR and "error.type" in la
    assert ra["gen_ai.provider.name"] == "mistral_ai" and ra["spillover.attempt"] == 2
    assert ra["http.response.status_code"] == 200
    assert remote.status.status_code != StatusCode.ERROR
    assert local.start_time is not None and remote.start_time is not None
    assert local.start_time <= remote.start_time

    # La Plateforme got the hosted attempt's own context as traceparent.
    (headers,) = seen
    assert headers["traceparent"] == (
        f"00-{CALLER_TRACE}-{remote.context.span_id:016x}-01")


async def test_a_refusal_ends_its_span_with_the_error(client: httpx.AsyncClient,
                                                      exporter: InMemorySpanExporter) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["http.response.status_code"] == 404
    assert span.parent is None  # no caller traceparent: a new trace


async def test_a_stream_span_ends_when_the_stream_is_booked(
        client: httpx.AsyncClient, world: World, exporter: InMemorySpanExporter) -> None:
    world.local = lambda req: httpx.Response(
        200, headers={"content-type": "text/event-stream"},
        content=sse([chunk("demo", "Hi"), chunk("demo", "!", finish="stop"),
                     chunk("demo", usage=(7, 2))]))
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    for _ in range(50):
        if len(exporter.get_finished_spans()) == 2:
            break
        await asyncio.sleep(0.02)
    (request,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    attrs = dict(request.attributes or {})
    assert attrs["spillover.stream"] is True and attrs["spillover.route"] == "local"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (7, 2)


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
])
def test_on_only_when_the_otel_variables_ask(env: dict[str, str], on: bool) -> None:
    assert enabled(env) is on
    tracing = Tracing.from_env(env)
    assert (tracing is not None) is on
    if tracing is not None:
        tracing.shutdown()


async def test_off_by_default_the_gateway_holds_no_tracer(world: World) -> None:
    app = create_app(Settings(env=dict(ENV)), config=config(), transport=world.transport())
    async with lifespan_client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
    rt: Any = app.state.runtime
    assert rt.tracing is None and rt.parts.gateway.tracing is None
    # Off, nothing is propagated upstream either.
    assert "traceparent" not in str(world.seen)


def _spans(exporter: InMemorySpanExporter) -> tuple[Any, list[Any]]:
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT),
                      key=lambda s: s.start_time or 0)
    return request, attempts


async def _settled(exporter: InMemorySpanExporter, n: int) -> None:
    for _ in range(100):  # a stream's spans end with its clean-up, just after the body
        if len(exporter.get_finished_spans()) >= n:
            return
        await asyncio.sleep(0.02)


class _SlowStream(httpx.AsyncByteStream):
    """An engine stream whose events come 20 ms apart; records when the last one left."""

    def __init__(self, last: list[int]) -> None:
        self._last = last

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(5):
            await asyncio.sleep(0.02)
            yield b"data: " + orjson.dumps(chunk("demo", f"t{i}")) + b"\n\n"
        await asyncio.sleep(0.02)
        self._last.append(time.time_ns())
        yield b"data: " + orjson.dumps(chunk("demo", finish="stop")) + b"\n\n"
        yield b"data: " + orjson.dumps(chunk("demo", usage=(9, 5))) + b"\n\n"
        yield b"data: [DONE]\n\n"


async def test_a_streamed_attempt_span_ends_when_the_stream_ends(
        client: httpx.AsyncClient, world: World, exporter: InMemorySpanExporter) -> None:
    last: list[int] = []
    world.local = lambda req: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=_SlowStream(last))
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    await _settled(exporter, 2)
    request, (attempt,) = _spans(exporter)
    # Not when the stream opened (the first event): after the engine's last event.
    assert attempt.end_time is not None and attempt.end_time >= last[0]
    attrs = dict(attempt.attributes or {})
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (9, 5)
    assert attrs["spillover.outcome"] == "completed" and attrs["spillover.stream"] is True
    assert attrs["http.response.status_code"] == 200
    assert attempt.status.status_code != StatusCode.ERROR
    assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
    assert request.end_time is not None and request.end_time >= attempt.end_time


async def test_a_caller_gone_mid_stream_ends_the_attempt_span_with_that_outcome(
        world: World, exporter: InMemorySpanExporter) -> None:
    from tests.unit.test_stream_cleanup import EVENTS, TrackedStream

    closed: list[bool] = []
    world.local = lambda req: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                             stream=TrackedStream(closed))
    app = create_app(Settings(env=dict(ENV)), config=config(), transport=world.transport(),
                     tracing=Tracing(SimpleSpanProcessor(exporter)))
    body = orjson.dumps({**CHAT, "stream": True})
    async with app.router.lifespan_context(app):
        await call_then_leave(app, "/v1/chat/completions", body, after=4)
        await _settled(exporter, 2)
    assert closed == [True]
    request, (attempt,) = _spans(exporter)
    attrs = dict(attempt.attributes or {})
    assert attrs["spillover.outcome"] == "client_disconnected"
    assert attrs["error.type"] == "client_disconnected"
    assert attempt.status.status_code == StatusCode.ERROR
    # What was relayed before the caller left, estimated as the ledger books it.
    assert 1 <= attrs["gen_ai.usage.output_tokens"] < EVENTS
    assert attrs["spillover.usage_estimated"] is True
    assert dict(request.attributes or {})["http.response.status_code"] == 499


async def test_a_cascade_escalation_is_an_attempt_under_the_request_span(
        world: World, exporter: InMemorySpanExporter) -> None:
    from tests.unit.test_tiers_gateway import EASY, KEYS, PERSON, tiered_config

    world.local = lambda req: httpx.Response(200, json=completion("demo", "no json here"))
    world.hosted = lambda req: httpx.Response(
        200, json=completion(orjson.loads(req.content)["model"], '{"name": "Ada"}',
                             usage=(30, 6)))
    app = create_app(Settings(env=dict(ENV)), config=tiered_config(),
                     transport=world.transport(), tracing=Tracing(SimpleSpanProcessor(exporter)))
    async with lifespan_client(app) as c:
        r = await c.post("/v1/chat/completions", json={**EASY, "response_format": PERSON},
                         headers={"authorization": f"Bearer {KEYS['app']}",
                                  "traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-tier"] == "flagship"
    request, (first, second) = _spans(exporter)
    assert len(exporter.get_finished_spans()) == 3
    for child in (first, second):
        assert child.parent is not None and child.parent.span_id == request.context.span_id
        assert f"{child.context.trace_id:032x}" == CALLER_TRACE
    fa, sa = dict(first.attributes or {}), dict(second.attributes or {})
    # The lower tier's answer, thrown away: wasted, with why.
    assert fa["spillover.tier"] == "demo" and fa["spillover.wasted"] == "json-schema"
    assert "spillover.cascade" not in fa
    # The call one tier up: the cascade's escalation.
    assert sa["spillover.cascade"] == "escalation" and sa["spillover.tier"] == "flagship"
    assert sa["spillover.escalation"] == r.headers["x-spillover-escalation"]
    assert sa["gen_ai.request.model"] == "mistral-large-latest" and sa["spillover.attempt"] == 2
    assert "spillover.wasted" not in sa
    assert (sa["gen_ai.usage.input_tokens"], sa["gen_ai.usage.output_tokens"]) == (30, 6)
    ra = dict(request.attributes or {})
    assert ra["spillover.tier"] == "flagship" and ra["spillover.attempts"] == 2
    assert ra["spillover.cascade.trigger"] == "json-schema"
    assert ra["spillover.cascade.from_tier"] == "demo"
    assert ra["gen_ai.response.model"] == "mistral-large-latest"
    assert request.end_time is not None and second.end_time is not None
    assert request.end_time >= second.end_time


async def test_count_tokens_has_a_span_with_the_engine_tokenize_call_as_child(
        client: httpx.AsyncClient, world: World, exporter: InMemorySpanExporter) -> None:
    seen: list[httpx.Headers] = []

    def local(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/tokenize"
        seen.append(req.headers)
        return httpx.Response(200, json={"count": 17, "max_model_len": 2048, "tokens": []})

    world.local = local
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/messages/count_tokens", json=body,
                          headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200 and r.json() == {"input_tokens": 17}
    request, (tokenize,) = _spans(exporter)
    ra = dict(request.attributes or {})
    assert request.name == "count_tokens" and f"{request.context.trace_id:032x}" == CALLER_TRACE
    assert ra["spillover.api"] == "messages" and ra["gen_ai.request.model"] == "demo"
    assert ra["gen_ai.usage.input_tokens"] == 17 and ra["spillover.token_count"] == "engine"
    assert ra["http.response.status_code"] == 200
    ta = dict(tokenize.attributes or {})
    assert tokenize.parent is not None and tokenize.parent.span_id == request.context.span_id
    assert tokenize.name == "tokenize demo" and ta["gen_ai.usage.input_tokens"] == 17
    assert ta["http.response.status_code"] == 200 and ta["server.port"] == 8101
    # The engine got the tokenize call's own context.
    (headers,) = seen
    assert headers["traceparent"] == f"00-{CALLER_TRACE}-{tokenize.context.span_id:016x}-01"

    # Engine down: the estimate answers; the failed call is still a child, in error.
    exporter.clear()
    world.local_up = False
    r = await client.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200 and r.headers["x-spillover-token-count"] == "estimate"
    request, (tokenize,) = _spans(exporter)
    assert dict(request.attributes or {})["spillover.token_count"] == "estimate"
    assert tokenize.status.status_code == StatusCode.ERROR
    assert request.status.status_code != StatusCode.ERROR

    # A refusal: the span ends with its status.
    exporter.clear()
    r = await client.post("/v1/messages/count_tokens", json={"model": "demo"})
    assert r.status_code == 400
    (only,) = exporter.get_finished_spans()
    assert only.status.status_code == StatusCode.ERROR
    assert dict(only.attributes or {})["http.response.status_code"] == 400
