"""OpenAI's Responses API, stateless: `POST /v1/responses`.

A Responses request is turned into a chat completions request (router.providers.responses)
right after the caller is authenticated, and from there takes the chat way through the
gateway: the same aliases, policies, limits, budgets, failover, headers and ledger row
(its endpoint recorded as `responses`). The answer is turned back on the way out: a
Response object or the Responses event stream. Errors keep OpenAI's shape, so the
gateway's one renderer serves them; a stream that breaks ends with an `error` event and
`response.failed`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope

from router.http.reshape import (
    BODY_HEADERS,
    Piece,
    chat_events,
    json_body,
    reshape_stream,
)
from router.http.streaming import EventStream
from router.providers.responses import (
    ResponseStream,
    chat_to_response,
    echo,
    request_to_chat,
)
from router.providers.shapes import event_data

if TYPE_CHECKING:
    from router.routing.gateway import Gateway



async def responses(gateway: Gateway, scope: Scope, receive: Receive) -> Response:
    seen: list[tuple[str, dict[str, Any]]] = []

    def prepare(body: dict[str, Any]) -> dict[str, Any]:
        chat = request_to_chat(body)
        seen.append((chat["model"], echo(body)))
        return chat

    # SpilloverError propagates: the app's handler renders it in OpenAI's shape.
    response = await gateway.handle("chat", scope, receive, api="responses", prepare=prepare)
    model, settings = seen[0] if seen else ("", echo({}))
    # A local engine that serves Responses itself answered it (router.providers.vllm_native).
    engine = response.headers.get("x-spillover-upstream-api") == "responses"
    if isinstance(response, EventStream):
        reshape_stream(response, (lambda relay: _engine_events(relay, model)) if engine
                       else lambda relay: _events(relay, ResponseStream(model, settings)))
        return response
    if response.status_code >= 400:
        return response
    headers = {k: v for k, v in response.headers.items() if k not in BODY_HEADERS}
    data = json_body(response)
    if engine:  # the engine's own Response, named as the caller named the model
        if isinstance(data, dict):
            data["model"] = model
        return Response(orjson.dumps(data), 200, headers, media_type="application/json")
    return Response(orjson.dumps(chat_to_response(data, model, settings)), 200, headers,
                    media_type="application/json")


def _events(relay: AsyncIterable[Piece],
            stream: ResponseStream) -> AsyncGenerator[bytes, None]:
    """The relayed chat events as Responses events. `[DONE]` completes the response; an
    error event becomes an error event and response.failed."""
    return chat_events(relay, stream.feed, stream.done,
                       lambda err: stream.error(_code_of(err), str(err.get("message", ""))))


async def _engine_events(relay: AsyncIterable[Piece], model: str,
                         ) -> AsyncGenerator[bytes, None]:
    """A local engine's own Responses events, relayed as they came but for the response
    object's model (the caller's); an error event of the gateway's own (bare data in
    OpenAI's shape: the deadline passed, the upstream broke off) becomes the Responses
    `error` event, which the SDKs raise."""
    seq = 0
    async for part in relay:
        piece = part.encode() if isinstance(part, str) else bytes(part)
        out: list[bytes] = []
        for raw in piece.split(b"\n\n"):
            if not raw:
                continue
            data = event_data(raw)
            if data is None:
                out.append(raw + b"\n\n")
                continue
            n = data.get("sequence_number")
            seq = n + 1 if isinstance(n, int) else seq
            err = data.get("error")
            if raw.startswith(b"data:") and isinstance(err, Mapping):
                failed = {"type": "error", "code": _code_of(err),
                          "message": str(err.get("message", "")), "param": None,
                          "sequence_number": seq}
                out.append(b"event: error\ndata: " + orjson.dumps(failed) + b"\n\n")
                continue
            resp = data.get("response")
            if isinstance(resp, dict) and "model" in resp:
                resp["model"] = model
                name = raw.split(b"\n", 1)[0] if raw.startswith(b"event:") else None
                out.append((name + b"\n" if name else b"") + b"data: " + orjson.dumps(data)
                           + b"\n\n")
                continue
            out.append(raw + b"\n\n")
        if out:
            yield b"".join(out)


def _code_of(err: Mapping[str, Any]) -> str:
    return "rate_limit_exceeded" if err.get("type") == "rate_limit_error" else "server_error"
