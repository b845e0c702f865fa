"""What the API surfaces answered in another shape than chat (Messages, Responses) share:
their body goes through the gateway as chat, and its answer, whole or streamed, is
reshaped on the way out."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from typing import Any

import orjson

from router.http.streaming import EventStream, Relay

# Response headers that describe the chat body, not the one that replaces it.
BODY_HEADERS = frozenset({"content-length", "content-type"})

Piece = str | bytes | memoryview


def reshape_stream(response: EventStream,
                   translate: Callable[[AsyncIterable[Piece]], AsyncGenerator[bytes, None]],
                   ) -> None:
    """Replace a relayed chat stream's body with its translation, keeping the relay's
    one clean-up (its aclose) so a caller that goes away still ends the upstream call."""
    relay = response.body_iterator
    end = getattr(relay, "aclose", None)
    translated = translate(relay)
    response.body_iterator = Relay(translated, end) if end is not None else translated


def json_body(response: Any) -> Any:
    """A whole chat answer's JSON ({} when it is not JSON)."""
    try:
        return orjson.loads(bytes(response.body))
    except orjson.JSONDecodeError:
        return {}


async def chat_events(relay: AsyncIterable[Piece],
                      feed: Callable[[Mapping[str, Any]], list[bytes]],
                      done: Callable[[], list[bytes]],
                      error: Callable[[Mapping[str, Any]], list[bytes]],
                      ) -> AsyncGenerator[bytes, None]:
    """The relayed chat events (whole SSE events, one or more a piece) in another API's
    events: each chunk through `feed`, `[DONE]` through `done`, an error event (the
    upstream broke off, the deadline passed) through `error`."""
    async for part in relay:
        piece = part.encode() if isinstance(part, str) else bytes(part)
        out: list[bytes] = []
        for raw in piece.split(b"\n\n"):
            if not raw.startswith(b"data:"):
                continue
            payload = raw[5:].strip()
            if payload == b"[DONE]":
                out.extend(done())
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            err = data.get("error")
            if isinstance(err, Mapping):
                out.extend(error(err))
                continue
            out.extend(feed(data))
        if out:
            yield b"".join(out)
