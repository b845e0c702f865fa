"""One call through the gateway, as it happens: what dispatch and the recorder fill in."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.accounting.budgets import Reservation
from router.routing.policy import RequestFacts
from router.routing.ratelimit import Admission
from router.routing.reasons import CallReason
from router.routing.tracing import RequestTrace

# The alias recorded for a request naming no alias of the catalog: never the caller's text.
UNKNOWN_ALIAS = "(unknown)"


@dataclass(slots=True)
class Call:
    """What one request did; becomes the access-log line and the ledger row."""

    request_id: str
    facts: RequestFacts
    started: float
    deadline: float
    caller: str = "anonymous"
    wall_started: float = field(default_factory=time.time)
    route: str | None = None
    backend: str | None = None
    model_id: str | None = None
    reason: CallReason = ""  # router.routing.reasons
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    hosted_equiv_usd: float | None = None  # what it would have cost on the alias's hosted price
    waited_s: float = 0.0  # waiting for local capacity (cost-first, residency)
    admission: Admission | None = None
    reservation: Reservation | None = None
    wants_usage: bool = False  # the caller asked for stream_options.include_usage
    ttft_s: float | None = None
    chunks: int = 0  # streamed events relayed: the completion estimate if cut off early
    usage_seen: bool = False
    usage_estimated: bool = False
    attempts: list[str] = field(default_factory=list)
    # Tiered aliases: the tier's alias, its score, why that tier (x-spillover-escalation),
    # and for a lower tier's call the cascade may re-send, what reads its answer: the
    # trigger it found marks this call wasted.
    tier: str | None = None
    tier_score: float | None = None
    escalation: str | None = None
    inspect: Callable[[dict[str, Any]], str | None] | None = None
    wasted: str | None = None
    api: str | None = None  # the API surface when not the endpoint's own (e.g. "messages")
    # The caller's body in its own API's shape, before it was made the endpoint's: an
    # upstream that speaks that API (Anthropic for "messages") is sent it natively.
    native: dict[str, Any] | None = None
    # The API the upstream was sent for such a caller ("messages", "responses", "chat"):
    # x-spillover-upstream-api.
    upstream_api: str | None = None
    batch_id: str = ""  # a line of /v1/batches: hosted at the batch price, grouped in usage
    # A deployment with several replicas: the one that served it ("address:port") and why.
    replica: str | None = None
    replica_why: str | None = None
    # The conversation key of x-spillover-session (a digest: the id is not kept as sent);
    # None: the key is read from the body.
    session_key: str | None = None
    trace: RequestTrace | None = None  # the request's span when tracing is on

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def inbound_api(self) -> str:
        """The API the request came in by, for the by-API views (metrics, dashboard): a
        line of a batch counts as the Batch API's."""
        return "batches" if self.batch_id else self.api or self.facts.endpoint

    def remaining(self) -> float:
        return self.deadline - time.monotonic()
