"""OpenTelemetry traces: one span per request, a child span per upstream attempt.

Configured only by the standard OTEL_* environment variables and exported over OTLP
(OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _PROTOCOL, _HEADERS; OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER are read by the SDK itself). Off unless an
OTLP endpoint is named or OTEL_TRACES_EXPORTER=otlp; OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none turn it off. Off, the gateway holds no Tracing at all: each
request pays one `is None` test per hook, nothing else.

The request span continues the caller's `traceparent` (W3C trace context) and carries
the decision, with the GenAI semantic conventions' names where they have one
(gen_ai.operation.name, gen_ai.request.model, gen_ai.response.model,
gen_ai.usage.input_tokens / output_tokens, gen_ai.request.max_tokens) and spillover.*
for the rest (route, backend, reason, tier, caller, cost). Each attempt on an upstream is
a CLIENT child span (gen_ai.provider.name, server.address, error.type), whose context
goes to the engine or provider as `traceparent`: retries and failovers show as siblings.
A streamed attempt's span ends with the stream (its tokens and its outcome: completed,
caller gone, upstream broke off, deadline), as does the request span (when the call is
booked). A tiered cascade's second call is one more attempt under the same request span,
marked `spillover.cascade=escalation`, and the first answer's attempt `spillover.wasted`.
/v1/messages/count_tokens has a span of its own, the engine's /tokenize call its child.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from starlette.responses import Response

    from router.routing.call import Call
    from router.routing.catalog import Backend

_PROPAGATOR = TraceContextTextMapPropagator()
# gen_ai.operation.name by endpoint (GenAI semantic conventions' well-known values).
_OPERATION = {"chat": "chat", "completions": "text_completion", "fim": "text_completion",
              "embeddings": "embeddings"}
# gen_ai.provider.name by backend flavour, where the conventions name the provider.
_PROVIDER = {"vllm": "vllm", "mistral": "mistral_ai", "openai": "openai",
             "anthropic": "anthropic"}


def enabled(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces exported over OTLP."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None and exporter.strip():
        return "otlp" in [e.strip().lower() for e in exporter.split(",")]
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class Tracing:
    """The tracer of one app (no global provider: tests and reloads build their own)."""

    def __init__(self, processor: SpanProcessor, service_name: str = "spillover") -> None:
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(processor)
        self.tracer = self._provider.get_tracer("spillover")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing | None:
        """A Tracing exporting over OTLP as the OTEL_* variables say, or None when off."""
        if not enabled(env):
            return None
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        # The exporter reads its endpoint, headers, timeout and TLS settings from the
        # OTEL_EXPORTER_OTLP_* variables itself; only the chosen one is imported (gRPC
        # pulls in grpcio).
        if protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcExporter,
                )
            except ImportError as exc:
                raise RuntimeError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: "
                                   "pip install 'spillover[otlp-grpc]'") from exc
            processor = BatchSpanProcessor(GrpcExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )
            processor = BatchSpanProcessor(HttpExporter())
        return cls(processor, env.get("OTEL_SERVICE_NAME") or "spillover")

    def start(self, endpoint: str, headers: Mapping[str, str],
              api: str | None = None) -> RequestTrace:
        """The request's span, a child of the caller's traceparent when it sent one."""
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
        operation = _OPERATION.get(endpoint, endpoint)
        span = self.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER,
                                       attributes={"gen_ai.operation.name": operation,
                                                   "spillover.api": api or endpoint})
        return RequestTrace(self, span, operation)

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes what the batch processor still holds


class RequestTrace:
    """The spans of one request: the SERVER span, and the CLIENT span of the attempt now
    in flight (at most one: attempts are sequential)."""

    __slots__ = ("_attempts", "_ctx", "_escalation", "_held", "_open", "_tracing",
                 "operation", "span")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self._tracing = tracing
        self.span = span
        self.operation = operation
        self._ctx: Context = set_span_in_context(span)
        self._open: Span | None = None  # the attempt in flight, ended by its outcome
        self._attempts = 0  # every attempt of the request, the cascade's second call too
        self._escalation: Call | None = None  # the cascade's call, once it escalates
        # The first call of a cascade whose answer failed its check: what it cost, kept
        # for the request span, which stays open for the call one tier up.
        self._held: tuple[str, str, float | None] | None = None

    def attempt(self, call: Call, b: Backend, headers: MutableMapping[str, str]) -> Span:
        """A child span for one attempt on `b`; its traceparent goes into `headers`."""
        url = urlsplit(b.base_url)
        self._attempts += 1
        attrs: dict[str, str | int] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": b.model_id,
            "gen_ai.provider.name": _PROVIDER.get(str(b.flavour), str(b.flavour)),
            "spillover.route": b.route, "spillover.backend": b.label,
            "spillover.attempt": self._attempts,
            "server.address": url.hostname or "",
        }
        if url.port is not None:
            attrs["server.port"] = url.port
        if call.tier:
            attrs["spillover.tier"] = call.tier
        if self._escalation is call and call.escalation:
            # The cascade's second call: the tier above, after the first answer failed.
            attrs["spillover.cascade"] = "escalation"
            attrs["spillover.escalation"] = call.escalation
        span = self._tracing.tracer.start_span(
            f"{self.operation} {b.model_id}", context=self._ctx, kind=SpanKind.CLIENT,
            attributes=attrs)
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        self._open = span
        return span

    def attempt_failed(self, status: int | None, failure: str,
                       kind: str | None = None) -> None:
        """The attempt in flight failed before answering (the next target may follow)."""
        span, self._open = self._open, None
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("error.type", str(status) if status else (kind or "error"))
        span.set_status(Status(StatusCode.ERROR, failure))
        span.end()

    def escalate(self, call: Call) -> None:
        """The cascade re-sends the request one tier up as `call`: its attempts are
        children of this request span, marked as the escalation."""
        self._escalation = call
        call.trace = self

    def _attempt_end(self, call: Call) -> None:
        """The attempt that answered ends with the call: for a stream, when the stream
        ends (completed, cut off, or its caller gone), with the tokens relayed."""
        span, self._open = self._open, None
        if span is None:
            return
        attrs: dict[str, str | int | bool] = {
            "gen_ai.usage.input_tokens": call.prompt_tokens,
            "gen_ai.usage.output_tokens": call.completion_tokens,
            "spillover.outcome": _OUTCOME.get(call.status, "error" if call.status >= 400
                                              else "completed"),
        }
        if call.model_id:
            attrs["gen_ai.response.model"] = call.model_id
        if call.usage_estimated:
            attrs["spillover.usage_estimated"] = True
        if call.facts.stream:
            attrs["spillover.stream"] = True
            # The upstream answered 200 (a stream opens on nothing else); what became of
            # it is the outcome.
            attrs["http.response.status_code"] = 200
        else:
            attrs["http.response.status_code"] = call.status
        if call.wasted is not None:
            attrs["spillover.wasted"] = call.wasted
        span.set_attributes(attrs)
        if call.status >= 400:
            span.set_attribute("error.type", _ERROR_TYPE.get(call.status, str(call.status)))
            span.set_status(Status(StatusCode.ERROR, str(call.reason)))
        span.end()

    def end(self, call: Call) -> None:
        """The decision and the outcome on the request span, which ends here; except
        after a tiered call whose answer failed the cascade's check, which the gateway
        re-sends one tier up: the span stays open for that call (or for `end` again
        with the same call, when the tier above cannot take it)."""
        self._attempt_end(call)
        span = self.span
        if not span.is_recording():
            return
        if call.inspect is not None and call.wasted is not None and self._held is None:
            self._held = (call.tier or "", call.wasted, call.cost_usd)
            return
        alias = call.facts.alias
        span.update_name(f"{self.operation} {alias}")
        attrs: dict[str, str | int | float] = {
            "gen_ai.request.model": alias,
            "gen_ai.usage.input_tokens": call.prompt_tokens,
            "gen_ai.usage.output_tokens": call.completion_tokens,
            "http.response.status_code": call.status,
            "spillover.caller": call.caller, "spillover.reason": str(call.reason),
            "spillover.request_id": call.request_id,
            "spillover.attempts": max(self._attempts, len(call.attempts)),
            "spillover.stream": call.facts.stream,
        }
        if call.facts.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = call.facts.max_tokens
        if call.model_id:
            attrs["gen_ai.response.model"] = call.model_id
        if call.route:
            attrs["spillover.route"] = call.route
        if call.backend:
            attrs["spillover.backend"] = call.backend
        if call.tier:
            attrs["spillover.tier"] = call.tier
        if call.escalation:
            attrs["spillover.escalation"] = call.escalation
        if call.cost_usd is not None:
            attrs["spillover.cost_usd"] = call.cost_usd
        if self._held is not None and call is self._escalation:
            tier, trigger, cost = self._held
            attrs["spillover.cascade.from_tier"] = tier
            attrs["spillover.cascade.trigger"] = trigger
            if cost is not None:
                attrs["spillover.cascade.wasted_cost_usd"] = cost
        span.set_attributes(attrs)
        if call.status >= 400:
            span.set_attribute("error.type", str(call.status))
            span.set_status(Status(StatusCode.ERROR, str(call.reason)))
        span.end()

    # -- count_tokens -----------------------------------------------------------------

    def tokenize(self, b: Backend, headers: MutableMapping[str, str]) -> Span:
        """A CLIENT child span for the engine's /tokenize call (count_tokens)."""
        url = urlsplit(b.base_url)
        attrs: dict[str, str | int] = {
            "gen_ai.request.model": b.model_id,
            "gen_ai.provider.name": _PROVIDER.get(str(b.flavour), str(b.flavour)),
            "spillover.route": b.route, "spillover.backend": b.label,
            "server.address": url.hostname or "",
        }
        if url.port is not None:
            attrs["server.port"] = url.port
        self.span.set_attribute("gen_ai.request.model", b.alias)
        span = self._tracing.tracer.start_span(
            f"tokenize {b.model_id}", context=self._ctx, kind=SpanKind.CLIENT,
            attributes=attrs)
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        return span

    @staticmethod
    def tokenized(span: Span, status: int | None, count: int | None,
                  failure: str | None = None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if count is not None:
            span.set_attribute("gen_ai.usage.input_tokens", count)
        if failure is not None or status != 200:
            span.set_attribute("error.type", str(status) if status else (failure or "error"))
            span.set_status(Status(StatusCode.ERROR, failure or str(status)))
        span.end()


# What a call's status says of how its answer ended (a stream's: how the relay ended).
_OUTCOME = {200: "completed", 499: "client_disconnected", 502: "upstream_broke_off",
            504: "deadline"}
_ERROR_TYPE = {499: "client_disconnected", 502: "upstream_broke_off", 504: "timeout"}

# The count_tokens request being served: its trace, for the engine's /tokenize call
# (router.routing.dispatch.count_prompt), which the Messages surface makes without one.
_COUNTING: ContextVar[RequestTrace | None] = ContextVar("spillover_counting", default=None)


def counting() -> RequestTrace | None:
    """The trace of the count_tokens request this task serves, if traced."""
    return _COUNTING.get()


async def traced_count(tracing: Tracing, headers: Mapping[str, str],
                       serve: Callable[[], Awaitable[Response]]) -> Response:
    """A count_tokens request under its own SERVER span; the engine's /tokenize call, if
    made, is its child. The span ends with the answer: its status and the count."""
    parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
    span = tracing.tracer.start_span("count_tokens", context=parent, kind=SpanKind.SERVER,
                                     attributes={"gen_ai.operation.name": "count_tokens",
                                                 "spillover.api": "messages"})
    token = _COUNTING.set(RequestTrace(tracing, span, "count_tokens"))
    status = 500
    try:
        response = await serve()
        status = response.status_code
        how = response.headers.get("x-spillover-token-count")
        if how:
            span.set_attribute("spillover.token_count", how)
        if status == 200:
            try:
                count = orjson.loads(bytes(response.body)).get("input_tokens")
            except (orjson.JSONDecodeError, AttributeError):
                count = None
            if isinstance(count, int):
                span.set_attribute("gen_ai.usage.input_tokens", count)
        return response
    finally:
        _COUNTING.reset(token)
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR, str(status)))
        span.end()
