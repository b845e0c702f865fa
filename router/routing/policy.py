"""The routing decision: a pure function of the request, its backends and their state.

No I/O and no clock: everything it reads is handed in, so it is tested as a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from router.config import Endpoint, Mode, Price, Priority
from router.routing.catalog import Backend
from router.routing.reasons import RefusalCode, RouteReason, SkipReason

Force = Literal["local", "hosted", "auto"]

# The order in which a skipped local explains why a request went hosted.
_LOCAL_REASONS: tuple[RouteReason, ...] = (
    "forced", "license", "capability", "context-length", "local-saturated", "local-down")
# Skips that time can undo: an engine that comes up or drains, a budget hold released, a
# breaker closing. A refusal is retryable (503/429 with Retry-After) only when one of its
# skips is one of these; every other skip (capability, context length, licence, residency,
# a forced route, the caller's cost cap, a missing API key) stands however long one waits.
_TRANSIENT: frozenset[SkipReason] = frozenset(
    {"local-down", "local-saturated", "budget", "unavailable"})
# Retry-After for a wait with no better estimate: saturated engines drain in seconds.
RETRY_SOON_S = 5


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
    # Output tokens a request without max_tokens may produce (routing.default_max_tokens):
    # a hosted call is sent this max_tokens, so the worst case below holds.
    assumed_max_tokens: int = 4096
    # An upper bound on the prompt's tokens (prompt_tokens is only an estimate, for
    # context lengths); 0: not known, the estimate stands in.
    prompt_tokens_max: int = 0
    # Answers generated per request (n, or best_of where larger): each may be max_tokens.
    choices: int = 1
    # The traffic class (router.config.PRIORITIES): batch keeps the engines' headroom for
    # interactive traffic and goes hosted only at a batch price.
    priority: Priority = "interactive"

    @property
    def output_tokens_max(self) -> int:
        if self.endpoint == "embeddings":
            return 0
        return (self.max_tokens or self.assumed_max_tokens) * self.choices

    @property
    def tokens_max(self) -> int:
        """The most tokens this request can use: what rate limits charge up front."""
        return max(self.prompt_tokens, self.prompt_tokens_max) + self.output_tokens_max

    def worst_case_usd(self, b: Backend) -> float:
        """The most the request can cost on `b`: what a hosted attempt holds."""
        price = self.price_on(b)
        if price is None:
            return 0.0
        prompt = max(1, self.prompt_tokens, self.prompt_tokens_max)
        return price.cost(prompt, self.output_tokens_max)

    def price_on(self, b: Backend) -> Price | None:
        """What `b` charges this request: batch work pays the batch price."""
        return b.batch_price if self.priority == "batch" else b.price


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
    # Down because its process was started and has not answered /health since: it will.
    starting: bool = False
    starting_for_s: float | None = None
    ready_in_s: float | None = None  # from how long its last start took; None if unknown
    # On an engine that schedules by priority, the load interactive and standard requests
    # are admitted on: the batch class's own requests left out (the engine serves the
    # others first), so batch work never makes a more urgent request spill that would
    # have run locally without it. None: the same as saturated/score.
    urgent_saturated: bool | None = None
    urgent_score: float | None = None
    batch_inflight: int = 0


@dataclass(frozen=True, slots=True)
class Skip:
    backend: str
    reason: SkipReason
    detail: str


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 400, 403, 429, 503
    code: RefusalCode  # also the response's x-spillover-reason
    message: str
    # Whole seconds after which the same request may be answered; None when waiting cannot
    # change the answer (then the status is never 429, and 503 only for a gateway that
    # needs its operator).
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class RoutePlan:
    targets: tuple[Backend, ...]
    reason: RouteReason
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
    *,
    keyless: Mapping[str, str] | None = None,
    retry_in: Mapping[str, float] | None = None,
) -> RoutePlan:
    """`unavailable`: backends that cannot be tried now (open breaker), `retry_in` seconds
    until each may be tried again; `keyless`: hosted backends -> the API key variable that
    is not set (they are not candidates at all)."""
    unavailable = unavailable or {}
    keyless = keyless or {}
    skipped: list[Skip] = []
    ready: list[tuple[float, Backend]] = []
    saturated: list[tuple[float, Backend]] = []
    hosted: list[tuple[float, Backend]] = []

    for b in backends:
        why: tuple[SkipReason, str] | None = (
            ("no-api-key", f"${keyless[b.name]} is not set")
            if b.route == "hosted" and b.name in keyless else _unfit(facts, b, unavailable))
        if why is not None:
            skipped.append(Skip(b.name, *why))
        elif b.route == "hosted":
            hosted.append((facts.worst_case_usd(b), b))
        else:
            state = load.get(b.name)
            if state is None or not state.healthy:
                skipped.append(Skip(b.name, "local-down", _down_text(state)))
                continue
            full, score = state.saturated, state.score
            if facts.priority != "batch" and state.urgent_score is not None:
                full, score = bool(state.urgent_saturated), state.urgent_score
            if full:
                skipped.append(Skip(b.name, "local-saturated", _load_text(state)))
                saturated.append((score, b))
            elif facts.priority == "batch" and score >= b.batch_line:
                # Not full, but past the batch line: the rest is interactive headroom.
                skipped.append(Skip(b.name, "local-saturated", f"{_load_text(state)}, at or "
                                    f"over the batch line {b.batch_line:g}"))
                saturated.append((score, b))
            else:
                ready.append((score, b))

    ready.sort(key=lambda t: t[0])
    saturated.sort(key=lambda t: t[0])
    hosted.sort(key=lambda t: t[0])  # cheapest first; catalog order breaks ties
    # A saturated engine still queues work: better than failing once every hosted target
    # has failed, so it stays at the end of the plan.
    targets = [b for _, b in ready] + [b for _, b in hosted] + [b for _, b in saturated]
    skips = tuple(skipped)

    if ready:
        reason: RouteReason = "forced" if facts.force == "local" else "local-ok"
        return RoutePlan(tuple(targets), reason, skips)
    if hosted:
        wait = facts.mode == "cost-first" and bool(saturated)
        return RoutePlan(tuple(targets), _hosted_reason(skipped, backends), skips,
                         wait_for_local=wait)
    refusal = _refusal(facts, skipped, backends, load, retry_in or {})
    return RoutePlan((), "none", skips, refusal, wait_for_local=bool(saturated))


def _unfit(facts: RequestFacts, b: Backend,
           unavailable: Mapping[str, str]) -> tuple[SkipReason, str] | None:
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
        if facts.priority == "batch" and b.batch_price is None:
            return "priority", "batch work goes hosted only at a batch price; none is set"
        if b.name in unavailable:
            return "unavailable", unavailable[b.name]
        worst = facts.worst_case_usd(b)
        if facts.max_request_usd is not None and worst > facts.max_request_usd:
            return "cost", (f"worst case ${worst:.4f} is over the "
                            f"per-request limit ${facts.max_request_usd:g}")
        if facts.hosted_allowance_usd is not None and worst > facts.hosted_allowance_usd:
            # Not the amount left: it may be the global budget's, no caller's to see.
            return "budget", f"worst case ${worst:.4f} is over what is left in the budget"
    return None


def _hosted_reason(skipped: list[Skip], backends: Sequence[Backend]) -> RouteReason:
    if not any(b.route == "local" for b in backends):
        return "hosted-only"
    reasons = {s.reason for s in skipped}
    for r in _LOCAL_REASONS:
        if r in reasons:
            return r
    return "local-down"


def _refusal(facts: RequestFacts, skipped: list[Skip], backends: Sequence[Backend],
             load: Mapping[str, EngineLoad], retry_in: Mapping[str, float]) -> Refusal:
    reasons = {s.reason for s in skipped}
    if reasons & _TRANSIENT:
        return _retryable(facts, skipped, backends, load, retry_in)
    return _permanent(facts, skipped, backends)


def _permanent(facts: RequestFacts, skipped: list[Skip],
               backends: Sequence[Backend]) -> Refusal:
    """Nothing here changes with time: the same request gets the same answer."""
    reasons = {s.reason for s in skipped}
    why = _why(skipped)
    if reasons <= {"capability"}:
        return Refusal(400, "unsupported", f"'{facts.alias}' does not serve {facts.endpoint}")
    if "license" in reasons:
        detail = next(s.detail for s in skipped if s.reason == "license")
        return Refusal(403, "license", f"the local weights' licence forbids this use: "
                       f"{detail}; no hosted backend may take it ({why})")
    # The hosted backends' own cap comes first: lowering max_tokens is what helps.
    if "cost" in reasons:
        return Refusal(400, "cost_limit", f"the request's worst case is over the caller's "
                       f"max_request_usd on every hosted backend and no local engine may "
                       f"take it; lower max_tokens ({why})")
    if "context-length" in reasons:
        limit = max(b.context_length or 0 for b in backends
                    if any(s.backend == b.name and s.reason == "context-length"
                           for s in skipped))
        need = facts.prompt_tokens + (facts.max_tokens or 0)
        return Refusal(400, "context_length_exceeded",
                       f"the prompt (about {facts.prompt_tokens} tokens) plus max_tokens "
                       f"({facts.max_tokens or 0}) need {need} tokens; the largest context "
                       f"of a backend that may take this request is {limit} tokens ({why})")
    if "priority" in reasons:
        return Refusal(400, "priority_unavailable",
                       f"'{facts.alias}' has no local engine that may take batch work and no "
                       f"hosted offering with a batch price; send it as standard or "
                       f"interactive ({why})")
    if "forced" in reasons:
        return Refusal(400, "route_unavailable",
                       f"no {facts.force} backend serves '{facts.alias}' ({why})")
    if "residency" in reasons:
        return Refusal(403, "residency", f"the request must stay on-prem and '{facts.alias}' "
                       f"has no local engine that serves it ({why})")
    # Only backends without an API key are left: a gateway only its operator can fix.
    return Refusal(503, "no_backend", f"no backend of '{facts.alias}' can be used: no hosted "
                   f"fallback is configured ({why})")


def _retryable(facts: RequestFacts, skipped: list[Skip], backends: Sequence[Backend],
               load: Mapping[str, EngineLoad], retry_in: Mapping[str, float]) -> Refusal:
    """Waiting can help: say how long, in the header and the message alike."""
    reasons = {s.reason for s in skipped}
    details = {s.reason: s.detail for s in skipped}
    down = [s.backend for s in skipped if s.reason == "local-down"]
    starting = [load[n] for n in down if n in load and load[n].starting]
    if starting and reasons <= {"local-down", "capability", "context-length", "license",
                                "no-api-key", "residency", "forced", "cost"}:
        etas = [e.ready_in_s for e in starting if e.ready_in_s is not None]
        wait = max(1, math.ceil(min(etas))) if etas else RETRY_SOON_S * 2
        eta = (f"expected ready in about {wait} s" if etas
               else "its readiness is not known yet: it has not started here before")
        names = ", ".join(f"'{n}'" for n in down if n in load and load[n].starting)
        return Refusal(503, "local_starting", f"the local engine {names} is starting "
                       f"({eta}) and {_no_hosted(facts, skipped, backends)}; retry in "
                       f"{wait} s", wait)
    if facts.priority == "batch" and "local-saturated" in reasons:
        return Refusal(503, "batch_deferred", "batch work runs locally only below the "
                       "engines' batch line, keeping headroom for interactive traffic "
                       f"({details['local-saturated']}), and "
                       f"{_no_hosted(facts, skipped, backends)}; retry in {RETRY_SOON_S} s",
                       RETRY_SOON_S)
    if "budget" in reasons:
        return Refusal(429, "budget_exceeded", f"hosted budget exhausted: {details['budget']}"
                       " and no local engine can take the request now")
    if "residency" in reasons:
        return Refusal(503, "residency", "the request must stay on-prem and no local engine "
                       f"can take it now; retry in {RETRY_SOON_S} s", RETRY_SOON_S)
    if "cost" in reasons:
        return Refusal(503, "cost_limit", f"{details['cost']} and no local engine can take "
                       f"the request now; retry in {RETRY_SOON_S} s", RETRY_SOON_S)
    waits = [retry_in[s.backend] for s in skipped
             if s.reason == "unavailable" and s.backend in retry_in]
    if "unavailable" in reasons:
        # The breakers' own wait; a saturated engine may drain sooner. A down engine that
        # is not starting gives no date, so the breaker's stands.
        if "local-saturated" in reasons:
            waits.append(RETRY_SOON_S)
        wait = max(1, math.ceil(min(waits))) if waits else RETRY_SOON_S
        return Refusal(503, "circuit_open", "every hosted backend that could take it is "
                       f"failing ({_why(skipped)}); retry in {wait} s", wait)
    return Refusal(503, "no_backend", f"no backend can serve this request now "
                   f"({_why(skipped)}); retry in {RETRY_SOON_S} s", RETRY_SOON_S)


def _no_hosted(facts: RequestFacts, skipped: list[Skip], backends: Sequence[Backend]) -> str:
    keyless = [s.detail for s in skipped if s.reason == "no-api-key"]
    if keyless:
        return f"no hosted fallback is configured ({', '.join(sorted(set(keyless)))})"
    if not any(b.route == "hosted" for b in backends):
        return f"'{facts.alias}' has no hosted fallback"
    hosted = {b.name for b in backends if b.route == "hosted"}
    return "no hosted backend may take it (" + "; ".join(
        f"{s.backend}: {s.detail}" for s in skipped if s.backend in hosted) + ")"


def _why(skipped: list[Skip]) -> str:
    return "; ".join(f"{s.backend}: {s.detail}" for s in skipped)


def _down_text(state: EngineLoad | None) -> str:
    if state is None or not state.starting:
        return "engine not answering its health check"
    parts = ["engine starting"]
    if state.starting_for_s is not None:
        parts.append(f"for {state.starting_for_s:.0f} s")
    if state.ready_in_s is not None:
        parts.append(f"expected ready in about {max(1, math.ceil(state.ready_in_s))} s")
    return ", ".join(parts)


def _load_text(s: EngineLoad) -> str:
    parts = [f"inflight={s.inflight}"]
    if s.waiting is not None:
        parts.append(f"waiting={s.waiting:g}")
    if s.kv_cache is not None:
        parts.append(f"kv={s.kv_cache:.2f}")
    return " ".join(parts)
