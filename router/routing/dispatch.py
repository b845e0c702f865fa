"""Carrying out a RoutePlan: the upstream call, failover before the first byte, streaming.

A target may fail (connect error, timeout, 408/429/5xx) and the next one is tried, as
long as nothing has reached the caller. Once the first byte is out, a failure can only
end the stream with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.responses import Response

from router.accounting.budgets import Budgets
from router.accounting.ledger import StoreUnavailable
from router.accounting.ledger_spool import RETRY_AFTER_S
from router.accounting.recorder import Recorder
from router.config import Price, Priority
from router.errors import (
    GatewayTimeout,
    RateLimited,
    Scrubber,
    SpilloverError,
    Unavailable,
    UpstreamError,
    from_upstream,
    sse_event,
    to_response,
)
from router.http.streaming import EventStream, Relay
from router.providers import (
    VLLM_PRIORITY,
    AnthropicTranslator,
    Prepared,
    Translator,
    bound_output,
    engine_priority,
)
from router.providers.anthropic_upstream import ANTHROPIC_VERSION, NATIVE, native_usage
from router.providers.shapes import event_data
from router.providers.vllm_native import (
    RESPONSES_NATIVE,
    is_terminal,
    messages_request,
    messages_unsuited,
    responses_request,
    responses_unsuited,
    responses_usage,
)
from router.routing.call import Call
from router.routing.catalog import Backend
from router.routing.engine_apis import APIS, missing_route
from router.routing.load import LoadMonitor
from router.routing.policy import RoutePlan
from router.routing.reasons import OutcomeReason, RouteReason
from router.routing.replicas import conversation_key
from router.routing.resilience import (
    Breakers,
    RetryPolicy,
    parse_retry_after,
    replica_name,
    request_too_large,
)
from router.routing.tracing import RequestTrace, counting
from router.upstreams.sse import SSEFramer
from router.upstreams.transport import TransportError, Upstream, UpstreamResponse

log = logging.getLogger("spillover.dispatch")
access = logging.getLogger("spillover.access")

# 529: Anthropic's overloaded_error.
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(slots=True)
class _Failure:
    backend: Backend
    what: str
    status: int | None = None
    retry_after: str | None = None
    connect: bool = False
    # "upstream": about the upstream's health; "request": the upstream refused this request
    # for itself (too large for its rate limit), which says nothing of its health;
    # "budget", "breaker", "store", "config": why the target was not even tried.
    kind: str = "upstream"
    retry_in_s: float | None = None  # an open breaker's wait
    error: SpilloverError | None = None  # what the caller gets for a "request" failure


class Dispatcher:
    def __init__(
        self,
        upstream: Upstream,
        monitor: LoadMonitor,
        translators: Mapping[str, Translator],
        api_keys: Mapping[str, str | None],
        *,
        breakers: Breakers,
        retry: RetryPolicy,
        budgets: Budgets,
        local_price: Callable[[Backend], Price | None],
        hosted_price: Callable[[str], Price | None],
        recorder: Recorder,
    ) -> None:
        self._upstream = upstream
        self._monitor = monitor
        self._translators = translators
        self._keys = api_keys
        self._scrub = Scrubber(k for k in api_keys.values() if k)
        self._breakers = breakers
        self._retry = retry
        self._budgets = budgets
        self._local_price = local_price
        self._hosted_price = hosted_price
        self._recorder = recorder
        # Per discovered deployment: how many replica picks so far, which spreads requests
        # without a conversation key over equally loaded replicas (replicas.choose).
        self._turns: dict[str, int] = {}

    async def run(self, call: Call, plan: RoutePlan, body: dict[str, Any]) -> Response:
        if (why := self._recorder.refusal()) is not None:  # a ledger that cannot bill
            call.reason = "ledger-unavailable"
            err = Unavailable(why, code="ledger_unavailable",
                              headers={"retry-after": str(RETRY_AFTER_S)})
            await self._finish(call, err.status)
            return to_response(err, self._route_headers(call))
        failures: list[_Failure] = []
        for backend in plan.targets:
            if call.remaining() <= 0:
                break
            headers = self._headers(call, backend)
            if headers is None:
                # The plan leaves keyless offerings out; this only guards a key that
                # vanished between the plan and the call.
                failures.append(_Failure(backend, f"${backend.api_key_env} is not set",
                                         kind="config"))
                continue
            translator = self._translators[backend.name]
            if call.api == "messages" and call.native is not None \
                    and isinstance(translator, AnthropicTranslator):
                # A Messages request to Claude goes as the caller sent it: no round trip
                # through chat.
                prep = translator.native(call.native, backend.model_id)
            else:
                prep = translator.request(call.facts.endpoint, body, backend.model_id,
                                          include_usage=True)
            if backend.route == "hosted":
                bound_output(prep, call.facts.endpoint, call.facts.assumed_max_tokens)
            engine_priority(prep, call.facts.priority if backend.priority_scheduling else None)
            content = orjson.dumps(prep.body)
            # Which API the upstream is sent (x-spillover-upstream-api) for a caller of
            # another API than chat; a local engine may still take it natively (_send_engine).
            # Claude is always sent Messages, translated from chat when not the caller's.
            call.upstream_api = (None if call.native is None
                                 else call.api if prep.reshape == NATIVE
                                 else "messages" if isinstance(translator, AnthropicTranslator)
                                 else "chat")
            result = await self._target(call, plan, backend, prep, content, headers, failures)
            if result is not None:
                return result
        return await self._give_up(call, failures)

    async def _target(self, call: Call, plan: RoutePlan, b: Backend, prep: Prepared,
                      content: bytes, headers: dict[str, str],
                      failures: list[_Failure]) -> Response | None:
        """Attempts on one target: retried with backoff (hosted only: a local engine that
        fails is better left for the hosted spill), behind its circuit breaker, each hosted
        attempt under a budget reservation taken before the call. A deployment with
        replicas is retried on a sibling replica instead (_sibling_next)."""
        hosted = b.route == "hosted"
        breaker = self._breakers.get(b.name) if hosted else None
        tries = 0
        tried: list[str] = []  # the replicas of `b` this request failed on
        while call.remaining() > 0:
            if breaker is not None and not breaker.allow():
                failures.append(_Failure(b, f"circuit open, retry in {breaker.retry_after_s()} s",
                                         kind="breaker", retry_in_s=breaker.retry_in()))
                return None
            if hosted:
                try:
                    call.reservation = await self._budgets.reserve(
                        call.caller, call.facts.worst_case_usd(b))
                except StoreUnavailable as exc:
                    if breaker is not None:
                        breaker.release()
                    failures.append(_Failure(b, str(exc), kind="store"))
                    return None
                if call.reservation is None:
                    if breaker is not None:
                        breaker.release()
                    failures.append(_Failure(b, "hosted budget exhausted", kind="budget"))
                    return None
            call.reason = _reason(plan.reason, failures)
            call.attempts.append(b.name)
            tries += 1
            sent = headers
            if call.trace is not None:  # a child span; its traceparent goes upstream
                sent = dict(headers)
                call.trace.attempt(call, b, sent)
            if call.facts.stream:
                result = await self._open_stream(call, b, prep, content, sent, tried)
            else:
                result = await self._once(call, b, prep, content, sent, tried)
            # An answer ends its attempt's span with the call (a stream's when the stream
            # ends); a failure here, before the next target.
            if call.trace is not None and isinstance(result, _Failure):
                call.trace.attempt_failed(result.status, result.what, result.kind)
            if call.replica is not None:
                # The attempt records (ledger line, access log, /status) name the replica.
                call.attempts[-1] = replica_name(b.name, call.replica)
                self._replica_verdict(b, call.replica, result)
            if not isinstance(result, _Failure):
                if breaker is not None:
                    breaker.success()
                return result
            if call.reservation is not None:
                self._budgets.release(call.reservation)
                call.reservation = None
            failures.append(result)
            log.info("request %s: %s failed before the first byte: %s",
                     call.request_id, call.attempts[-1], result.what)
            if breaker is None:
                if self._sibling_next(call, b, prep, result, tried, tries):
                    continue
                return None
            if result.kind == "request":
                # One caller's oversized request must not shut the upstream for everyone,
                # nor be retried there: no verdict on the upstream; the next target may
                # have room for it.
                breaker.release()
                return None
            # Connect errors, timeouts, 5xx and rate limits about the caller's traffic as a
            # whole count against the upstream; a rate limit opens the breaker at once.
            wait_s = parse_retry_after(result.retry_after, time.time())
            breaker.failure(wait_s if result.status == 429 else None)
            if tries >= self._retry.attempts_per_target:
                return None
            delay = self._retry.delay(tries, wait_s)
            if delay is None or delay >= call.remaining():
                return None
            await asyncio.sleep(delay)
        return None

    def _sibling_next(self, call: Call, b: Backend, prep: Prepared, failure: _Failure,
                      tried: list[str], tries: int) -> bool:
        """After replica A of a deployment failed before the first byte: whether the next
        attempt goes to a sibling replica rather than to the plan's next target (hosted,
        paid, while the siblings may be idle). Bounded like a hosted target's retries
        (routing.attempts_per_target attempts on the deployment in all), never the same
        replica twice for one request, and only to a sibling that is healthy, closed and
        not saturated (the conversation's next choice on the ring, or the least loaded).
        No pause before it: a sibling is another engine, not the one that just failed."""
        if call.replica is None or failure.kind == "request":
            return False  # one engine; or the request itself was refused, anywhere alike
        if failure.what == "timed out" and not failure.connect:
            # The engine may have worked on it all that time; the deadline is mostly spent.
            return False
        tried.append(call.replica)
        if tries >= self._retry.attempts_per_target or call.remaining() <= 0:
            return False
        return self._monitor.pick(b.name, self._conversation(call, prep),
                                  tried=tried) is not None

    def _replica_verdict(self, b: Backend, replica: str, result: Response | _Failure) -> None:
        """A replica's own breaker: a 5xx, a reset or a timeout before the first byte counts
        against it (its /health may still answer); any other answer closes it."""
        breaker = self._breakers.find(replica_name(b.name, replica))
        if breaker is None:  # DNS dropped the replica meanwhile
            return
        if isinstance(result, _Failure):
            if result.kind == "request":
                breaker.release()
            else:
                breaker.failure()
        elif result.status_code >= 500:
            breaker.failure()
        else:
            breaker.success()

    def _headers(self, call: Call, b: Backend) -> dict[str, str] | None:
        headers = {"content-type": "application/json", "x-request-id": call.request_id}
        if b.api_key_env:
            key = self._keys.get(b.api_key_env)
            if not key:
                return None
            if b.flavour == "anthropic":
                headers["x-api-key"] = key
                headers["anthropic-version"] = ANTHROPIC_VERSION
            else:
                headers["authorization"] = f"Bearer {key}"
        return headers

    async def _send(self, call: Call, b: Backend, prep: Prepared, content: bytes,
                    headers: dict[str, str], base_url: str | None = None,
                    ) -> UpstreamResponse | _Failure:
        try:
            return await self._upstream.post((base_url or b.base_url) + prep.path, content,
                                             headers, b.timeouts, call.remaining())
        except TransportError as exc:
            return self._transport_failure(b, exc, call.replica)

    async def _send_engine(self, call: Call, b: Backend, prep: Prepared, content: bytes,
                           headers: dict[str, str], url: str | None,
                           ) -> tuple[UpstreamResponse | _Failure, Prepared]:
        """Send `prep` (chat), or, to a local engine that serves the caller's own API
        (Messages, Responses), the caller's request natively. A native request the engine
        refuses before answering (no such route, or a 4xx of its own) is sent again
        translated, so the native way never fails where the translated one would not;
        a missing route is remembered for the engine. Returns what was sent and answered."""
        native = self._native(call, b)
        if native is None:
            return await self._send(call, b, prep, content, headers, url), prep
        resp = await self._send(call, b, native, orjson.dumps(native.body), headers, url)
        if isinstance(resp, _Failure) or resp.status < 400 or resp.status in RETRYABLE:
            call.upstream_api = call.api
            return resp, native
        try:
            body = await resp.read()
        except TransportError:
            body = b""
        api = call.api or ""
        if missing_route(resp.status, body):
            self._monitor.apis.learn(_engine_key(b, call.replica), api, False,
                                     f"POST /v1{native.path} answered {resp.status}")
        log.info("request %s: %s answered %s on its own %s API; sent as chat instead",
                 call.request_id, b.name, resp.status, api)
        return await self._send(call, b, prep, content, headers, url), prep

    def _native(self, call: Call, b: Backend) -> Prepared | None:
        """The engine's own Messages/Responses request for this call, when the engine (the
        replica picked) serves that API and the request suits it (router.providers.
        vllm_native says what stays translated, and why)."""
        api = call.api
        # A tier's answer the cascade inspects (call.inspect) must be a chat completion.
        if call.native is None or api is None or call.inspect is not None \
                or not self._goes_native(b, call.replica, api, call.native, call.facts.priority):
            return None
        if api == "messages":
            return messages_request(call.native, b.model_id)
        priority = VLLM_PRIORITY[call.facts.priority] if b.priority_scheduling else None
        return responses_request(call.native, b.model_id, priority)

    def _goes_native(self, b: Backend, replica: str | None, api: str, body: dict[str, Any],
                     cls: Priority) -> bool:
        if b.route != "local" or api not in APIS \
                or not self._monitor.apis.has(_engine_key(b, replica), api):
            return False
        if api == "messages":
            # vLLM's Messages request has no priority field: its default (0, the
            # interactive class's) is the only class it can carry.
            return not (b.priority_scheduling and VLLM_PRIORITY[cls]) \
                and messages_unsuited(body) is None
        return responses_unsuited(body) is None

    def _replica(self, call: Call, b: Backend, prep: Prepared,
                 tried: Sequence[str] = ()) -> str | None:
        """A deployment with replicas: the one for this request (its conversation's, while
        it has room; after `tried` failed, a sibling), recorded on the call; its base URL,
        or None for a single engine."""
        call.replica = call.replica_why = None
        if b.route != "local" or b.discover is None:
            return None
        turn = self._turns.get(b.name, 0)
        self._turns[b.name] = turn + 1
        picked = self._monitor.pick(b.name, self._conversation(call, prep), tried=tried,
                                    turn=turn)
        if picked is None:
            return None
        call.replica, url, choice = picked
        call.replica_why = (choice.why if not tried
                            else f"sibling-retry (after {', '.join(tried)})")
        return url

    @staticmethod
    def _conversation(call: Call, prep: Prepared) -> str | None:
        return call.session_key or conversation_key(call.caller, prep.body)

    async def count_prompt(self, b: Backend, body: dict[str, Any],
                           remaining_s: float, native: dict[str, Any] | None = None,
                           cls: Priority = "interactive") -> int | None:
        """The prompt's tokens as a local engine's own tokenizer and chat template count
        them (vLLM's /tokenize, at the server's root); None when it cannot tell. `native`:
        the caller's Messages count_tokens body, counted by the engine's own
        /v1/messages/count_tokens where a create would go to its /v1/messages: vLLM turns
        that request into its prompt with its own conversion, not ours, and its count
        runs the same conversion as its create, so the count is what the create bills."""
        if b.route != "local":
            return None
        if native is not None and self._goes_native(b, None, "messages", native, cls):
            counted = await self._count_natively(b, native, remaining_s)
            if counted is not None:
                return counted
        prep = self._translators[b.name].request("chat", body, b.model_id,
                                                 include_usage=False)
        payload = {k: v for k, v in prep.body.items() if k in ("model", "messages", "tools")}
        url = b.base_url.removesuffix("/v1") + "/tokenize"
        headers = {"content-type": "application/json"}
        trace = counting()  # a traced count_tokens request: this call is its child span
        span = None if trace is None else trace.tokenize(b, headers)
        count: Any = None
        status: int | None = None
        try:
            resp = await self._upstream.post(url, orjson.dumps(payload), headers,
                                             b.timeouts, remaining_s)
            status = resp.status
            data = await resp.read()
            if resp.status == 200:
                count = orjson.loads(data).get("count")
        except TransportError as exc:
            if span is not None:
                RequestTrace.tokenized(span, status, None, exc.kind)
            return None
        except (orjson.JSONDecodeError, AttributeError):
            count = None
        got = count if isinstance(count, int) and not isinstance(count, bool) else None
        if span is not None:
            RequestTrace.tokenized(span, status, got)
        return got

    async def _count_natively(self, b: Backend, body: dict[str, Any],
                              remaining_s: float) -> int | None:
        prep = messages_request(body, b.model_id)
        payload = {k: v for k, v in prep.body.items()
                   if k in ("model", "messages", "system", "tools", "tool_choice")}
        try:
            resp = await self._upstream.post(b.base_url + "/messages/count_tokens",
                                             orjson.dumps(payload),
                                             {"content-type": "application/json"},
                                             b.timeouts, remaining_s)
            data = await resp.read()
        except TransportError:
            return None
        if resp.status != 200:
            return None
        try:
            count = orjson.loads(data).get("input_tokens")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    async def _once(self, call: Call, b: Backend, prep: Prepared, content: bytes,
                    headers: dict[str, str], tried: Sequence[str] = (),
                    ) -> Response | _Failure:
        url = self._replica(call, b, prep, tried)
        replica = call.replica
        self._monitor.acquire(b.name, replica, batch=call.facts.priority == "batch")
        try:
            resp, prep = await self._send_engine(call, b, prep, content, headers, url)
            if isinstance(resp, _Failure):
                return resp
            try:
                body = await resp.read()
            except TransportError as exc:
                return self._transport_failure(b, exc, replica)
        finally:
            self._monitor.release(b.name, replica, batch=call.facts.priority == "batch")
        status = resp.status
        if status in RETRYABLE:
            return self._status_failure(b, status, resp.headers.get("retry-after"), body)
        self._started(call, b)
        if status >= 400:
            err = self._upstream_error(status, body)
            await self._finish(call, err.status)
            return to_response(err, self._route_headers(call))
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _Failure(b, "answered with a body that is not JSON", 502)
        payload = body
        if isinstance(data, dict):
            if self._translators[b.name].response(prep, data):
                payload = orjson.dumps(data)
            self._usage(call, b, _answer_usage(prep, data))
            if call.inspect is not None:  # a tiered call the cascade may re-send
                call.wasted = call.inspect(data)
        call.ttft_s = time.monotonic() - call.started
        await self._finish(call, 200)
        headers_out = self._route_headers(call)
        if call.cost_usd is not None:
            headers_out["x-spillover-cost-usd"] = f"{call.cost_usd:.8f}"
        return Response(payload, 200, headers_out, media_type="application/json")

    async def _open_stream(self, call: Call, b: Backend, prep: Prepared, content: bytes,
                           headers: dict[str, str], tried: Sequence[str] = (),
                           ) -> Response | _Failure:
        url = self._replica(call, b, prep, tried)
        replica = call.replica
        self._monitor.acquire(b.name, replica, batch=call.facts.priority == "batch")
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._monitor.release(b.name, replica, batch=call.facts.priority == "batch")

        resp, prep = await self._send_engine(call, b, prep, content, headers, url)
        if isinstance(resp, _Failure):
            release()
            return resp
        if resp.status != 200:
            try:
                body = await resp.read()
            except TransportError:
                body = b""
            finally:
                release()
            if resp.status in RETRYABLE:
                return self._status_failure(b, resp.status, resp.headers.get("retry-after"),
                                            body)
            self._started(call, b)
            err = self._upstream_error(resp.status, body)
            await self._finish(call, err.status)
            return to_response(err, self._route_headers(call))
        # Hold the response until the first event has arrived: until then a failure can
        # still move to the next target, and the caller's status code stays truthful.
        events = _sse_batches(resp)
        try:
            first = await anext(events)
        except (TransportError, StopAsyncIteration) as exc:
            await resp.aclose()
            release()
            if isinstance(exc, TransportError):
                return self._transport_failure(b, exc, replica)
            return _Failure(b, "closed the stream before its first event", 502)
        self._started(call, b)
        call.ttft_s = time.monotonic() - call.started
        end = _StreamEnd(self, call, b, resp, release)
        relay = Relay(self._relay(call, b, prep, events, first, end), end)
        try:
            return EventStream(relay, 200, self._route_headers(call))
        except BaseException:
            # The response could not even be built (a header that is not latin-1): the
            # caller gets the gateway's error, and the stream ends here, unstarted.
            end.status = 500
            await relay.aclose()
            raise

    async def _relay(self, call: Call, b: Backend, prep: Prepared,
                     events: AsyncIterator[list[bytes]], first: list[bytes],
                     end: _StreamEnd) -> AsyncGenerator[bytes, None]:
        translator = self._translators[b.name]
        wants_usage = call.wants_usage
        end.status = 200
        try:
            batch: list[bytes] | None = first
            async with asyncio.timeout(max(0.001, call.remaining())):
                while batch is not None:
                    outs = []
                    for event in batch:
                        out = self._translate_event(call, b, prep, translator, event,
                                                    wants_usage)
                        if out == _DONE or (not end.finished and out is not None
                                            and _native_end(prep, out)):
                            # Booked (and durable) before the caller sees the stream end.
                            end.finished = True
                            end.release()
                            await self._finish(call, 200)
                        if out is not None:
                            outs.append(out)
                    if outs:
                        # What one read brought (the last token, usage, [DONE]) goes out
                        # in one write.
                        yield outs[0] if len(outs) == 1 else b"".join(outs)
                    try:
                        batch = await anext(events)
                    except StopAsyncIteration:
                        batch = None
        except TimeoutError:
            end.status = 504
            yield sse_event(GatewayTimeout("the request passed its deadline mid-stream"))
        except TransportError as exc:
            if exc.timeout and call.remaining() <= 0:
                # The read timeout was bounded by the deadline and fired with it (which of
                # the two a stalled stream hits first is a matter of milliseconds).
                end.status = 504
                yield sse_event(GatewayTimeout("the request passed its deadline mid-stream"))
                return
            end.status = 502
            log.warning("request %s: stream from %s broke: %s", call.request_id,
                        call.attempts[-1] if call.attempts else b.name, exc.kind)
            if call.replica is not None:
                # Not retried (the caller has bytes already), but the replica that broke
                # it counts like one failing before the first byte.
                self._replica_verdict(b, call.replica, _Failure(b, exc.kind))
            yield sse_event(UpstreamError(f"the upstream stream from {b.label} broke off "
                                          f"({exc.kind})"))
        except (asyncio.CancelledError, GeneratorExit):
            end.status = 499  # the caller went away; closing the upstream cancels it there
            raise
        finally:
            await end()

    def _translate_event(self, call: Call, b: Backend, prep: Prepared, translator: Translator,
                         event: bytes, wants_usage: bool) -> bytes | None:
        if prep.reshape == NATIVE:
            return self._native_event(call, b, event)
        if prep.reshape == RESPONSES_NATIVE:
            return self._responses_event(call, b, event)
        if prep.events is not None:
            converted = prep.events(event)
            if converted is None:
                return None
            event = converted.removesuffix(b"\n\n")
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return _DONE
        if b'"error"' in payload:
            # An error event mid-stream may echo what we sent, our provider key included.
            payload = self._scrub(payload.decode("utf-8", "replace")).encode()
        if b'"content":""' not in payload or b'"tool_calls":[' in payload:
            call.chunks += 1  # vLLM opens with an empty role chunk: no token in it
        # Parse only what may need rewriting: usage-bearing chunks and, when ids were
        # translated or the shape differs, every chunk.
        has_usage = b'"usage"' in payload and b'"usage":null' not in payload
        if not (has_usage or prep.ids or prep.reshape):
            return b"data: " + payload + b"\n\n"
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b"data: " + payload + b"\n\n"
        if not isinstance(data, dict):
            return b"data: " + payload + b"\n\n"
        changed = translator.chunk(prep, data)
        if has_usage:
            self._usage(call, b, data.get("usage"))
            if not wants_usage:
                if not data.get("choices"):
                    return None  # the usage chunk we asked for on our own account
                # La Plateforme puts usage on its last content chunk, unasked.
                del data["usage"]
                changed = True
        if changed:
            payload = orjson.dumps(data)
        return b"data: " + payload + b"\n\n"

    def _native_event(self, call: Call, b: Backend, event: bytes) -> bytes:
        """An event of a stream relayed in the caller's own API (Messages from Claude):
        passed on as it came, its usage read for the ledger."""
        if b"error" in event:
            event = self._scrub(event.decode("utf-8", "replace")).encode()
        if b"content_block_delta" in event:
            call.chunks += 1
        elif b'"usage"' in event:
            data = event_data(event)
            usage = native_usage(data) if data is not None else None
            if usage is not None:
                if data is not None and data.get("type") == "message_delta" \
                        and not usage["prompt_tokens"]:
                    # message_delta counts the output; the input came with message_start.
                    usage["prompt_tokens"] = call.prompt_tokens
                self._usage(call, b, usage)
                if b.route == "local" and data is not None \
                        and data.get("type") == "message_start":
                    # A local engine's message_start counts no output yet: a stream cut
                    # before message_delta is booked as the chat path books one.
                    call.usage_seen = False
        return event + b"\n\n"

    def _responses_event(self, call: Call, b: Backend, event: bytes) -> bytes:
        """An event of an engine's own Responses stream: passed on as it came, its usage
        (on the terminal event) read for the ledger."""
        if b"error" in event:
            event = self._scrub(event.decode("utf-8", "replace")).encode()
        if b".delta" in event[:64]:
            call.chunks += 1
        elif is_terminal(event):
            data = event_data(event)
            usage = responses_usage(data) if data is not None else None
            if usage is not None:
                self._usage(call, b, usage)
        return event + b"\n\n"

    def _status_failure(self, b: Backend, status: int, retry_after: str | None,
                        body: bytes) -> _Failure:
        if status == 429 and request_too_large(body):
            err = self._upstream_error(413, body)
            err.type, err.code = "invalid_request_error", "request_too_large"
            return _Failure(b, f"answered {status}: the request is too large for it", status,
                            kind="request", error=err)
        return _Failure(b, f"answered {status}", status, retry_after)

    def _upstream_error(self, status: int, body: bytes) -> SpilloverError:
        """An upstream's error for the caller, with every provider key scrubbed from it
        (some providers echo the Authorization header they were sent)."""
        err = from_upstream(status, body)
        err.message = self._scrub(err.message)
        return err

    def _transport_failure(self, b: Backend, exc: TransportError,
                           replica: str | None = None) -> _Failure:
        # Refused means no engine there; a connect that timed out may only be a full
        # connection pool or a busy host, which the probes judge better.
        if exc.connect and not exc.timeout and b.route == "local":
            self._monitor.mark_down(b.name, f"connect failed: {exc.kind}", replica)
        return _Failure(b, "timed out" if exc.timeout else exc.kind, connect=exc.connect)

    async def _give_up(self, call: Call, failures: list[_Failure]) -> Response:
        err: SpilloverError
        kinds = {f.kind for f in failures}
        if call.remaining() <= 0:
            err = GatewayTimeout("no backend answered within the request's deadline")
        elif kinds == {"budget"}:
            err = RateLimited("hosted budget exhausted and no local engine can take the "
                              "request now", code="budget_exceeded")
            call.reason = "budget"
        elif "store" in kinds and kinds <= {"store", "budget", "breaker"}:
            # Nothing was tried: the budget store did not answer, which waiting can mend.
            store = next(f.what for f in failures if f.kind == "store")
            err = Unavailable(f"{store}; no local engine could take the request",
                              code="budget_store_unavailable",
                              headers={"retry-after": str(RETRY_AFTER_S)})
            call.reason = "budget-store"
        elif kinds == {"breaker"}:
            # The soonest breaker to close, rounded up: the header and the message agree.
            wait = math.ceil(min(f.retry_in_s or 0.0 for f in failures))
            err = Unavailable("every backend's circuit is open after repeated failures; "
                              f"retry in {wait} s", code="circuit_open",
                              headers={"retry-after": str(max(1, wait))})
            call.reason = "circuit-open"
        elif kinds == {"request"}:
            # Refused by every target for its size: the same request fails however long
            # the caller waits, so a 413 and not a retryable 429.
            err = failures[-1].error or UpstreamError("the request is too large")
            call.reason = "request-too-large"
        else:
            detail = "; ".join(f"{f.backend.label}: {f.what}" for f in failures) or "none"
            err = UpstreamError(f"every backend failed before answering ({detail})")
            retry_after = [f.retry_after for f in failures if f.retry_after]
            # Rate limits and dead engines only: the caller should come back later.
            if {f.status for f in failures if f.status is not None} == {429}:
                err.status, err.type, err.code = 429, "rate_limit_error", "upstream_rate_limited"
            if retry_after:
                err.headers["retry-after"] = retry_after[-1]
        if failures:
            last = failures[-1].backend
            call.route, call.backend = last.route, last.label
        call.reason = call.reason or "failover"
        await self._finish(call, err.status)
        return to_response(err, self._route_headers(call))

    def _started(self, call: Call, b: Backend) -> None:
        call.route, call.backend, call.model_id = b.route, b.label, b.model_id

    def _route_headers(self, call: Call) -> dict[str, str]:
        h = {"x-request-id": call.request_id, "x-spillover-reason": call.reason,
             "x-spillover-priority": call.facts.priority}
        if call.route:
            h["x-spillover-route"] = call.route
        if call.backend:
            h["x-spillover-backend"] = call.backend
        if call.upstream_api:
            h["x-spillover-upstream-api"] = call.upstream_api
        if call.tier is not None:
            h["x-spillover-tier"] = call.tier
            h["x-spillover-escalation"] = call.escalation or ""
        return h

    def _usage(self, call: Call, b: Backend, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        call.prompt_tokens = p if isinstance(p, int) else call.prompt_tokens
        call.completion_tokens = c if isinstance(c, int) else call.completion_tokens
        call.usage_seen = True
        self._cost(call, b)

    def _estimate_usage(self, call: Call, b: Backend) -> None:
        if call.route is None:
            return
        # The prompt's upper bound, not its estimate: what a cut-off hosted stream settles
        # must not undercount what the provider bills for it.
        call.prompt_tokens = max(call.facts.prompt_tokens, call.facts.prompt_tokens_max)
        call.completion_tokens = call.chunks  # about one token per streamed chunk
        call.usage_estimated = True
        self._cost(call, b)

    def _cost(self, call: Call, b: Backend) -> None:
        # Hosted batch work (the class, so the Batch API's lines too) pays the batch price.
        price = call.facts.price_on(b) if b.route == "hosted" else self._local_price(b)
        if price is not None:
            call.cost_usd = price.cost(call.prompt_tokens, call.completion_tokens)
        equiv = self._hosted_price(b.alias)
        if equiv is not None:
            call.hosted_equiv_usd = equiv.cost(call.prompt_tokens, call.completion_tokens)

    def _settle(self, call: Call, status: int) -> None:
        call.status = status
        r, call.reservation = call.reservation, None
        if r is not None:
            if call.cost_usd is not None:
                spent = call.cost_usd
            elif status < 400 or status == 499:
                # Served (or cut off mid-stream) without usage: the provider billed something.
                spent = r.amount_usd
            else:
                spent = 0.0
            self._budgets.settle(r, spent)

    async def _finish(self, call: Call, status: int) -> None:
        self._settle(call, status)
        await self._recorder.finish(call)
        if call.trace is not None:
            call.trace.end(call)

    def _finish_nowait(self, call: Call, status: int) -> None:
        self._settle(call, status)
        self._recorder.finish_nowait(call)
        if call.trace is not None:
            call.trace.end(call)


_DONE = b"data: [DONE]\n\n"


def _engine_key(b: Backend, replica: str | None) -> str:
    """The engine's key in the monitor's status (and its API knowledge)."""
    return b.name if replica is None else f"{b.name}@{replica}"


def _answer_usage(prep: Prepared, data: dict[str, Any]) -> Any:
    """A whole answer's usage, chat-shaped."""
    if prep.reshape == NATIVE:
        return native_usage(data)
    if prep.reshape == RESPONSES_NATIVE:
        return responses_usage(data)
    return data.get("usage")


def _native_end(prep: Prepared, out: bytes) -> bool:
    """The last event of a stream relayed in the caller's own API."""
    if prep.reshape == NATIVE:
        return out.startswith(b"event: message_stop")
    return prep.reshape == RESPONSES_NATIVE and is_terminal(out)
_BATCH_BYTES = 64 * 1024


def _reason(planned: RouteReason, failures: list[_Failure]) -> RouteReason | OutcomeReason:
    if not failures:
        return planned
    last = failures[-1]
    if last.backend.route == "local":
        return "local-down" if last.connect else "local-error"
    return "failover"


async def _sse_batches(resp: UpstreamResponse) -> AsyncIterator[list[bytes]]:
    """Whole SSE events (the bytes between blank lines, without their separators), as
    many as each piece from the upstream completed, up to _BATCH_BYTES a batch: each batch
    is one write to the caller, and a caller that reads slowly holds the relay back one
    batch at a time, so a stream stays in flight as long as its caller takes to read it.
    Framing is linear in the bytes received (router/upstreams/sse.py), however large the pieces."""
    framer = SSEFramer(_BATCH_BYTES)
    async for chunk in resp.chunks():
        for batch in framer.feed(chunk):
            yield batch
    tail = framer.close()
    if tail:
        yield tail


@dataclass(slots=True, eq=False)
class _StreamEnd:
    """The one clean-up of a relayed stream, run once whether its body ran to the end,
    broke, was cancelled, or never started (see router.http.streaming.Relay)."""

    dispatcher: Dispatcher
    call: Call
    backend: Backend
    resp: UpstreamResponse
    release: Callable[[], None]  # the engine's in-flight count; idempotent
    # Closed before the body ran: the caller never got the stream (its connection was
    # gone when the start went out); the body sets its own status once it runs.
    status: int = 499
    finished: bool = False  # booked at [DONE]
    ended: bool = False

    async def __call__(self) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            self.release()
            if not self.finished:
                d, call = self.dispatcher, self.call
                if not call.usage_seen:
                    # Cut off before the usage chunk: the upstream still billed what it
                    # generated, so book an estimate rather than nothing.
                    d._estimate_usage(call, self.backend)
                d._finish_nowait(call, self.status)
        finally:
            # The caller may be gone and this task cancelled: without the shield the
            # close would be cancelled too, and the upstream would go on generating.
            with anyio.CancelScope(shield=True):
                await self.resp.aclose()
