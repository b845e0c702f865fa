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

from router.http.reshape import BODY_HEADERS, Piece, chat_events, json_body, reshape_stream
from router.http.streaming import EventStream
from router.providers.responses import (
    ResponseStream,
    chat_to_response,
    echo,
    request_to_chat,
)

if TYPE_CHECKING:
    from router.routing.gateway import Gateway

RESPONSES_DOC: dict[str, Any] = {
    "description": "OpenAI's Responses API, stateless "
                   "(https://platform.openai.com/docs/api-reference/responses/create): "
                   "routed like a chat completion; previous_response_id and built-in "
                   "tools are refused.",
}


async def responses(gateway: Gateway, scope: Scope, receive: Receive) -> Response:
    seen: list[tuple[str, dict[str, Any]]] = []

    def prepare(body: dict[str, Any]) -> dict[str, Any]:
        chat = request_to_chat(body)
        seen.append((chat["model"], echo(body)))
        return chat

    # SpilloverError propagates: the app's handler renders it in OpenAI's shape.
    response = await gateway.handle("chat", scope, receive, api="responses", prepare=prepare)
    model, settings = seen[0] if seen else ("", echo({}))
    if isinstance(response, EventStream):
        reshape_stream(response, lambda relay: _events(relay, ResponseStream(model, settings)))
        return response
    if response.status_code >= 400:
        return response
    headers = {k: v for k, v in response.headers.items() if k not in BODY_HEADERS}
    data = json_body(response)
    return Response(orjson.dumps(chat_to_response(data, model, settings)), 200, headers,
                    media_type="application/json")


def _events(relay: AsyncIterable[Piece],
            stream: ResponseStream) -> AsyncGenerator[bytes, None]:
    """The relayed chat events as Responses events. `[DONE]` completes the response; an
    error event becomes an error event and response.failed."""
    return chat_events(relay, stream.feed, stream.done,
                       lambda err: stream.error(_code_of(err), str(err.get("message", ""))))


def _code_of(err: Mapping[str, Any]) -> str:
    return "rate_limit_exceeded" if err.get("type") == "rate_limit_error" else "server_error"
