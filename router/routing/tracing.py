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
A streamed attempt's span ends when the stream opens; the request span when the call is
booked (the end of the stream).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
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
    __slots__ = ("_ctx", "_tracing", "operation", "span")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self._tracing = tracing
        self.span = span
        self.operation = operation
        self._ctx: Context = set_span_in_context(span)

    def attempt(self, call: Call, b: Backend, headers: MutableMapping[str, str]) -> Span:
        """A child span for one attempt on `b`; its traceparent goes into `headers`."""
        url = urlsplit(b.base_url)
        attrs: dict[str, str | int] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": b.model_id,
            "gen_ai.provider.name": _PROVIDER.get(str(b.flavour), str(b.flavour)),
            "spillover.route": b.route, "spillover.backend": b.label,
            "spillover.attempt": len(call.attempts),
            "server.address": url.hostname or "",
        }
        if url.port is not None:
            attrs["server.port"] = url.port
        span = self._tracing.tracer.start_span(
            f"{self.operation} {b.model_id}", context=self._ctx, kind=SpanKind.CLIENT,
            attributes=attrs)
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        return span

    @staticmethod
    def attempt_done(span: Span, status: int | None, failure: str | None,
                     kind: str | None = None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if failure is not None or (status is not None and status >= 400):
            span.set_attribute("error.type", str(status) if status else (kind or "error"))
            span.set_status(Status(StatusCode.ERROR, failure or str(status)))
        span.end()

    def end(self, call: Call) -> None:
        """The decision and the outcome on the request span, which ends here."""
        span = self.span
        if not span.is_recording():
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
            "spillover.attempts": len(call.attempts),
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
        if call.cost_usd is not None:
            attrs["spillover.cost_usd"] = call.cost_usd
        span.set_attributes(attrs)
        if call.status >= 400:
            span.set_attribute("error.type", str(call.status))
            span.set_status(Status(StatusCode.ERROR, str(call.reason)))
        span.end()
