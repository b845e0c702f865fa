"""A caller that goes away mid-stream on /v1/messages: the call is still booked (a 499 row
with the usage estimated from what was relayed), the engine is no longer counted in flight
and the upstream stream is closed, as for chat completions (test_stream_cleanup)."""

from __future__ import annotations

import json

import httpx

from router.runtime import Runtime
from tests.unit.helpers import World, call_then_leave, gateway_app
from tests.unit.test_stream_cleanup import EVENTS, TrackedStream, ledger_rows

MSG = {"model": "demo", "max_tokens": 64, "stream": True,
       "messages": [{"role": "user", "content": "hello there, a long answer please"}]}


async def test_caller_gone_mid_stream_books_a_499_with_estimated_usage() -> None:
    closed: list[bool] = []
    world = World()
    world.local = lambda req: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                             stream=TrackedStream(closed))
    app = gateway_app(world)
    runtime: Runtime = app.state.runtime
    body = json.dumps(MSG).encode()
    async with app.router.lifespan_context(app):
        sent = await call_then_leave(app, "/v1/messages", body, after=4,
                                     headers=((b"anthropic-version", b"2023-06-01"),))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        relayed = b"".join(m.get("body", b"") for m in sent[1:])
        assert b"event: message_start" in relayed and b"message_stop" not in relayed
        rows = await ledger_rows(runtime, 1)
        assert [(r.endpoint, r.route, r.status) for r in rows] == [("messages", "local", 499)]
        (row,) = rows
        # Estimated: the prompt's upper bound, one token per relayed chunk.
        assert row.prompt_tokens > 0
        assert 1 <= row.completion_tokens < EVENTS
        assert all(e["inflight"] == 0 for e in runtime.monitor.status().values())
        assert closed == [True]
        assert runtime.gateway.streams.open("anonymous") == 0
