"""What happens once a call has ended: one structured log line, rate limits trued up,
and (when a ledger is configured) one ledger row."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import orjson

from router.dispatch import Call
from router.ratelimit import RateLimiter

access = logging.getLogger("spillover.access")


class Recorder:
    def __init__(self, limiter: RateLimiter, recent: int = 50) -> None:
        self._limiter = limiter
        # The latest decisions, for the status API and the dashboard.
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def finish(self, call: Call) -> None:
        if call.admission is not None:
            self._limiter.settle(call.admission,
                                 call.prompt_tokens + call.completion_tokens)
            call.admission = None
        line = entry(call)
        self.recent.appendleft(line)
        if access.isEnabledFor(logging.INFO):
            access.info("%s", orjson.dumps(line).decode())


def entry(call: Call) -> dict[str, Any]:
    return {
        "ts": round(call.wall_started, 3),
        "request_id": call.request_id,
        "caller": call.caller,
        "alias": call.facts.alias,
        "endpoint": call.facts.endpoint,
        "stream": call.facts.stream,
        "route": call.route,
        "backend": call.backend,
        "reason": call.reason,
        "status": call.status,
        "latency_ms": round((time.monotonic() - call.started) * 1000, 1),
        "ttft_ms": None if call.ttft_s is None else round(call.ttft_s * 1000, 1),
        "waited_ms": round(call.waited_s * 1000, 1),
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "cost_usd": call.cost_usd,
        "hosted_equiv_usd": call.hosted_equiv_usd,
        "attempts": call.attempts,
    }
