"""The reason tokens: why a request went where it went, or why it did not.

One token a request, the same everywhere it shows: the `x-spillover-reason` header, the
ledger's reason column, the `reason` label of `spillover_requests_total`, and the reasons
of `/v1/route/explain`. Defined here once, as types mypy holds every assignment to;
README's reason table says what each means and whether retrying can help (a unit test
keeps the two in step). Changing a token changes a public interface: dashboards and
ledger queries filter on them.
"""

from __future__ import annotations

from typing import Literal, NewType, TypeGuard, get_args

# Why `policy.decide` left a backend out of a plan: explain's "filtered" list. A local
# one's reason also becomes the plan's reason when the request goes hosted.
SkipReason = Literal[
    "capability", "residency", "forced", "license", "context-length", "priority",
    "unavailable", "cost", "budget", "no-api-key", "local-down", "local-saturated",
]

# Why the plan goes where it goes: a served response's x-spillover-reason. "none": the
# plan has no target (explain only; the response carries the refusal's code).
RouteReason = Literal[
    "local-ok", "forced", "license", "capability", "context-length", "local-saturated",
    "local-down", "hosted-only", "cost-first-waited", "cost-first-spill", "none",
]

# What the attempts changed: the plan's reason gives way to one of these when a target
# failed before its first byte (dispatch), whether the next one answered or none did.
OutcomeReason = Literal[
    "local-error", "failover", "budget", "budget-store", "circuit-open",
    "request-too-large", "ledger-unavailable",
]

# A routing refusal's error code, which is also its reason.
RefusalCode = Literal[
    "unsupported", "license", "cost_limit", "context_length_exceeded",
    "priority_unavailable", "route_unavailable", "residency", "no_backend",
    "local_starting", "batch_deferred", "budget_exceeded", "circuit_open",
]

Reason = Literal[SkipReason, RouteReason, OutcomeReason, RefusalCode]
# Every token once, in the order above.
REASONS: tuple[Reason, ...] = get_args(Reason)

# A request refused before any routing decision (authentication, rate limits, bad input)
# is counted under its error's own code: those are the API's error codes, not reasons.
ErrorCode = NewType("ErrorCode", str)

# What a call record carries: "" until something is decided.
CallReason = Reason | ErrorCode | Literal[""]

_TOKENS = frozenset(REASONS)


def is_reason(token: str) -> TypeGuard[Reason]:
    return token in _TOKENS
