"""The routing decision: a pure function of the request, its backends and their state.

No I/O and no clock: everything it reads is handed in, so it is tested as a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from router.catalog import Backend
from router.config import Endpoint, Mode

Force = Literal["local", "hosted", "auto"]

# The order in which a skipped local explains why a request went hosted.
_LOCAL_REASONS = ("forced", "license", "capability", "context-length", "local-saturated",
                  "local-down")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    alias: str
    endpoint: Endpoint
    stream: bool = False
    max_tokens: int | None = None
    prompt_tokens: int = 0
    force: Force = "auto"
    onprem_only: bool = False
    commercial_use: bool = True
    mode: Mode = "latency-first"
    max_request_usd: float | None = None
    # What the caller may still spend hosted (the tightest of its and the global budgets).
    hosted_allowance_usd: float | None = None
    # Output tokens assumed for the worst case when the request sets no max_tokens.
    assumed_max_tokens: int = 4096

    def worst_case_usd(self, b: Backend) -> float:
        if b.price is None:
            return 0.0
        out = self.max_tokens or self.assumed_max_tokens
        return b.price.cost(max(1, self.prompt_tokens), out)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    healthy: bool
    saturated: bool
    score: float  # 0 idle .. >=1 full; orders replicas
    inflight: int = 0
    waiting: float | None = None
    running: float | None = None
    kv_cache: float | None = None
    age_s: float | None = None  # of the scraped metrics; None when never scraped


@dataclass(frozen=True, slots=True)
class Skip:
    backend: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 400, 403, 429, 503
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RoutePlan:
    targets: tuple[Backend, ...]
    reason: str
    skipped: tuple[Skip, ...] = ()
    refusal: Refusal | None = None
    # Waiting could change the answer: every local is only saturated, and either the mode
    # prefers local (cost-first) or nothing else may take the request.
    wait_for_local: bool = False

    @property
    def route(self) -> str | None:
        return self.targets[0].route if self.targets else None


def decide(
    facts: RequestFacts,
    backends: Sequence[Backend],
    load: Mapping[str, EngineLoad],
    unavailable: Mapping[str, str] | None = None,
) -> RoutePlan:
    """`unavailable`: backends that cannot be tried now (open breaker, missing key)."""
    unavailable = unavailable or {}
    skipped: list[Skip] = []
    ready: list[tuple[float, Backend]] = []
    saturated: list[tuple[float, Backend]] = []
    hosted: list[tuple[float, Backend]] = []

    for b in backends:
        why = _unfit(facts, b, unavailable)
        if why is not None:
            skipped.append(Skip(b.name, *why))
        elif b.route == "hosted":
            hosted.append((facts.worst_case_usd(b), b))
        else:
            state = load.get(b.name)
            if state is None or not state.healthy:
                skipped.append(Skip(b.name, "local-down", "engine not answering its health check"))
            elif state.saturated:
                skipped.append(Skip(b.name, "local-saturated", _load_text(state)))
                saturated.append((state.score, b))
            else:
                ready.append((state.score, b))

    ready.sort(key=lambda t: t[0])
    saturated.sort(key=lambda t: t[0])
    hosted.sort(key=lambda t: t[0])  # cheapest first; catalog order breaks ties
    # A saturated engine still queues work: better than failing once every hosted target
    # has failed, so it stays at the end of the plan.
    targets = [b for _, b in ready] + [b for _, b in hosted] + [b for _, b in saturated]
    skips = tuple(skipped)

    if ready:
        reason = "forced" if facts.force == "local" else "local-ok"
        return RoutePlan(tuple(targets), reason, skips)
    if hosted:
        wait = facts.mode == "cost-first" and bool(saturated)
        return RoutePlan(tuple(targets), _hosted_reason(skipped, backends), skips,
                         wait_for_local=wait)
    refusal = _refusal(facts, skipped, bool(saturated))
    return RoutePlan((), "none", skips, refusal, wait_for_local=bool(saturated))


def _unfit(facts: RequestFacts, b: Backend,
           unavailable: Mapping[str, str]) -> tuple[str, str] | None:
    if facts.endpoint not in b.endpoints:
        return "capability", f"does not serve {facts.endpoint}"
    if b.route == "hosted":
        if facts.onprem_only:
            return "residency", "request must stay on-prem"
        if facts.force == "local":
            return "forced", "caller asked for local"
    else:
        if facts.force == "hosted":
            return "forced", "caller asked for hosted"
        if b.license is not None and facts.commercial_use and not b.license.commercial:
            return "license", f"{b.license.title} does not allow commercial use"
    if b.context_length is not None and facts.endpoint != "embeddings":
        need = facts.prompt_tokens + (facts.max_tokens or 0)
        if need > b.context_length:
            return "context-length", f"needs {need} tokens, context is {b.context_length}"
    if b.route == "hosted":
        if b.name in unavailable:
            return "unavailable", unavailable[b.name]
        worst = facts.worst_case_usd(b)
        if facts.max_request_usd is not None and worst > facts.max_request_usd:
            return "cost", (f"worst case ${worst:.4f} is over the caller's "
                            f"max_request_usd ${facts.max_request_usd:g}")
        if facts.hosted_allowance_usd is not None and worst > facts.hosted_allowance_usd:
            return "budget", (f"worst case ${worst:.4f} is over the "
                              f"${facts.hosted_allowance_usd:.4f} left in the budget")
    return None


def _hosted_reason(skipped: list[Skip], backends: Sequence[Backend]) -> str:
    if not any(b.route == "local" for b in backends):
        return "hosted-only"
    reasons = {s.reason for s in skipped}
    for r in _LOCAL_REASONS:
        if r in reasons:
            return r
    return "local-down"


def _refusal(facts: RequestFacts, skipped: list[Skip], saturated: bool) -> Refusal:
    reasons = {s.reason for s in skipped}
    details = {s.reason: s.detail for s in skipped}
    if reasons <= {"capability"}:
        return Refusal(400, "unsupported", f"'{facts.alias}' does not serve {facts.endpoint}")
    if reasons <= {"capability", "context-length"}:
        return Refusal(400, "context_length_exceeded",
                       "the prompt plus max_tokens exceed every backend's context length")
    if reasons <= {"capability", "context-length", "forced"}:
        return Refusal(400, "route_unavailable",
                       f"no {facts.force} backend serves '{facts.alias}'")
    if "license" in reasons and not saturated and "local-down" not in reasons:
        return Refusal(403, "license", f"the local weights' licence forbids this use: "
                       f"{details['license']}; no hosted backend may take it")
    if "budget" in reasons:
        return Refusal(429, "budget_exceeded", f"hosted budget exhausted: {details['budget']}"
                       " and no local engine can take the request now")
    if "residency" in reasons:
        return Refusal(503, "residency", "the request must stay on-prem and no local engine "
                       "can take it now")
    if "cost" in reasons:
        return Refusal(503, "cost_limit", f"{details['cost']} and no local engine can take "
                       "the request now")
    if "unavailable" in reasons:
        return Refusal(503, "circuit_open", "every hosted backend that could take it is "
                       f"failing: {details['unavailable']}")
    return Refusal(503, "no_backend", "no backend can serve this request now")


def _load_text(s: EngineLoad) -> str:
    parts = [f"inflight={s.inflight}"]
    if s.waiting is not None:
        parts.append(f"waiting={s.waiting:g}")
    if s.kv_cache is not None:
        parts.append(f"kv={s.kv_cache:.2f}")
    return " ".join(parts)
