"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`.

A Messages request is turned into a chat completions request (router.providers.anthropic)
right after the caller is authenticated, and from there takes the chat way through the
gateway: the same aliases, policies, limits, budgets, failover, headers and ledger row
(its endpoint recorded as `messages`). The answer is turned back on the way out: a JSON
Message, a Messages event stream, or an error in Anthropic's shape with its status codes
(503 becomes 529 `overloaded_error`).

Keys come as `x-api-key` (what Anthropic's SDK sends) or as a Bearer token;
`anthropic-version` and `anthropic-beta` are accepted and change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope

from router.errors import SpilloverError
from router.http.inbound import read_json
from router.http.reshape import (
    BODY_HEADERS,
    Piece,
    chat_events,
    json_body,
    reshape_stream,
)
from router.http.streaming import EventStream
from router.providers.anthropic import (
    MessageStream,
    anthropic_error,
    chat_to_message,
    error_from_openai,
    event,
    message_id,
    request_to_chat,
)
from router.providers.shapes import event_data

if TYPE_CHECKING:
    from router.routing.gateway import Gateway

log = logging.getLogger("spillover.messages")



def with_api_key(scope: Scope) -> Scope:
    """The scope with `x-api-key` as a Bearer token when no Authorization came, so the
    one authenticator reads either."""
    headers = scope["headers"]
    names = {k for k, _ in headers}
    if b"authorization" in names or b"x-api-key" not in names:
        return scope
    key = next(v for k, v in headers if k == b"x-api-key")
    return {**scope, "headers": [*headers, (b"authorization", b"Bearer " + key)]}


async def messages(gateway: Gateway, scope: Scope, receive: Receive) -> Response:
    model: list[str] = []
    stops: list[str] = []

    def prepare(body: dict[str, Any]) -> dict[str, Any]:
        chat = request_to_chat(body)
        model.append(chat["model"])
        stops.extend(chat.get("stop") or ())
        return chat

    try:
        response = await gateway.handle("chat", with_api_key(scope), receive,
                                        api="messages", prepare=prepare)
    except SpilloverError as exc:
        return error_response(exc)
    except Exception as exc:  # the caller gets Anthropic's shape, the log the detail
        log.error("unhandled %s on /v1/messages", type(exc).__name__, exc_info=exc)
        return error_response(SpilloverError("internal error in the gateway", status=500))
    name = model[0] if model else ""
    native = _served_natively(gateway, response)
    # A local engine that serves Messages itself answered it (router.providers.vllm_native).
    engine = not native and response.headers.get("x-spillover-upstream-api") == "messages"
    if isinstance(response, EventStream):
        if engine:
            reshape_stream(response, lambda relay: _engine_events(relay, name))
        else:
            reshape_stream(response, _native_events if native
                           else lambda relay: _events(relay, MessageStream(name, tuple(stops))))
        _add_request_id(response.headers.get("x-request-id"), response)
        return response
    headers = {k: v for k, v in response.headers.items() if k not in BODY_HEADERS}
    rid = headers.get("x-request-id")
    if rid:
        headers["request-id"] = rid
    if response.status_code >= 400:
        status, body = error_from_openai(response.status_code, bytes(response.body), rid)
        return Response(orjson.dumps(body), status, headers, media_type="application/json")
    if native:  # Claude's own Message, as it came
        return Response(bytes(response.body), 200, headers, media_type="application/json")
    data = json_body(response)
    if engine:  # the engine's own Message, named as the caller named the model
        if isinstance(data, dict):
            _as_ours(data, name)
        return Response(orjson.dumps(data), 200, headers, media_type="application/json")
    return Response(orjson.dumps(chat_to_message(data, name, stops)), 200, headers,
                    media_type="application/json")


async def count_tokens(gateway: Gateway, scope: Scope, receive: Receive) -> Response:
    """The prompt's input tokens: the alias's local engine counts them with its own
    tokenizer and chat template when it can; otherwise the gateway's estimate (about four
    characters a token), said so in `x-spillover-token-count`."""
    from router.routing.gateway import header_map

    try:
        headers = header_map(with_api_key(scope)["headers"])
        principal = gateway.auth.caller(headers)
        body = await read_json(receive, gateway.config.server.max_body_bytes, headers)
        chat = request_to_chat(body, count_only=True)
        planned = gateway.plan(principal, "chat", chat, headers)
        count = None
        # Only local engines are asked (count_prompt skips hosted ones): counting sends
        # nothing off-site, whatever the caller's residency.
        for backend in planned.backends:
            count = await gateway.dispatcher.count_prompt(
                backend, chat, gateway.config.server.request_timeout_s, native=body,
                cls=planned.facts.priority)
            if count is not None:
                break
    except SpilloverError as exc:
        return error_response(exc)
    except Exception as exc:
        log.error("unhandled %s on /v1/messages/count_tokens", type(exc).__name__,
                  exc_info=exc)
        return error_response(SpilloverError("internal error in the gateway", status=500))
    how = "engine" if count is not None else "estimate"
    tokens = count if count is not None else planned.facts.prompt_tokens
    return Response(orjson.dumps({"input_tokens": tokens}), 200,
                    {"x-spillover-token-count": how}, media_type="application/json")


def error_response(exc: SpilloverError) -> Response:
    headers = dict(exc.headers)
    rid = headers.get("x-request-id")
    if rid:
        headers["request-id"] = rid
    message = exc.message
    if exc.code == "missing_api_key":
        message = "missing API key: send it as 'x-api-key: <key>' or 'Authorization: Bearer <key>'"
    status, body = anthropic_error(exc.status, message, rid)
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _add_request_id(rid: str | None, response: EventStream) -> None:
    if rid:
        response.raw_headers.append((b"request-id", rid.encode("latin-1")))


def _events(relay: AsyncIterable[Piece],
            stream: MessageStream) -> AsyncGenerator[bytes, None]:
    """The relayed chat events as Messages events. `[DONE]` ends the message; an error
    event becomes Anthropic's error event."""
    return chat_events(relay, stream.feed, stream.done,
                       lambda err: [stream.error(_status_of(err),
                                                 str(err.get("message", "")))])


def _served_natively(gateway: Gateway, response: Response) -> bool:
    """Whether an Anthropic provider answered: the request went to it as Messages
    (router.routing.dispatch) and its answer is a Message already."""
    if response.headers.get("x-spillover-route") != "hosted":
        return False
    provider = gateway.config.providers.get(response.headers.get("x-spillover-backend", ""))
    return provider is not None and provider.kind == "anthropic"


async def _native_events(relay: AsyncIterable[Piece],
                         ) -> AsyncGenerator[bytes, None]:
    """Claude's Messages events relayed as they came; only an error event of the gateway's
    own (a deadline passed, the upstream broke off), in OpenAI's shape, is reworded."""
    async for part in relay:
        piece = part.encode() if isinstance(part, str) else bytes(part)
        # Claude's events open with an `event:` line; the gateway's own are bare data.
        if piece.startswith(b"data:") or b"\n\ndata:" in piece:
            out: list[bytes] = []
            for raw in piece.split(b"\n\n"):
                if raw.startswith(b"data:"):
                    try:
                        data = orjson.loads(raw[5:].strip())
                    except orjson.JSONDecodeError:
                        continue
                    err = data.get("error") if isinstance(data, dict) else None
                    if isinstance(err, Mapping):
                        out.append(MessageStream("").error(_status_of(err),
                                                           str(err.get("message", ""))))
                elif raw:
                    out.append(raw + b"\n\n")
            piece = b"".join(out)
        if piece:
            yield piece


def _as_ours(message: dict[str, Any], model: str) -> None:
    """An engine's Message as the translation would have named it: the caller's model
    (the alias, not the engine's served name) and a `msg_` id."""
    message["model"] = model
    message["id"] = message_id(message.get("id"))


async def _engine_events(relay: AsyncIterable[Piece], model: str,
                         ) -> AsyncGenerator[bytes, None]:
    """A local engine's own Messages events: relayed as they came (the gateway's own error
    events reworded), message_start's message named as the caller named the model."""
    started = False
    async for piece in _native_events(relay):
        if not started and b"event: message_start" in piece:
            started = True
            out = []
            for raw in piece.split(b"\n\n"):
                if raw.startswith(b"event: message_start"):
                    data = event_data(raw)
                    msg = data.get("message") if data is not None else None
                    if data is not None and isinstance(msg, dict):
                        _as_ours(msg, model)
                        out.append(event("message_start", data).removesuffix(b"\n\n"))
                        continue
                out.append(raw)
            piece = b"\n\n".join(out)
        yield piece


def _status_of(err: Mapping[str, Any]) -> int:
    kind = err.get("type")
    if kind == "timeout_error":
        return 504
    if kind == "rate_limit_error":
        return 429
    if kind == "service_unavailable":
        return 503
    return 500
