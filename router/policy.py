"""The routing decision: a pure function of the request, its backends and their load.

No I/O and no clock: everything it reads is handed in, so it is tested as a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from router.catalog import Backend
from router.config import Endpoint

Force = Literal["local", "hosted", "auto"]

# The order in which a skipped local explains why a request went hosted.
_LOCAL_REASONS = ("forced", "license", "capability", "context-length", "local-down",
                  "local-saturated")


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
    status: int  # 400, 403, 503
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RoutePlan:
    targets: tuple[Backend, ...]
    reason: str
    skipped: tuple[Skip, ...] = ()
    refusal: Refusal | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def route(self) -> str | None:
        return self.targets[0].route if self.targets else None


def decide(
    facts: RequestFacts,
    backends: Sequence[Backend],
    load: Mapping[str, EngineLoad],
) -> RoutePlan:
    skipped: list[Skip] = []
    ready: list[tuple[float, Backend]] = []
    saturated: list[tuple[float, Backend]] = []
    hosted: list[Backend] = []

    for b in backends:
        why = _unfit(facts, b)
        if why is not None:
            skipped.append(Skip(b.name, *why))
            continue
        if b.route == "hosted":
            hosted.append(b)
            continue
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
    # Cheapest hosted first; the catalog order breaks ties (stable sort).
    hosted.sort(key=lambda b: _worst_case_cost(b, facts))
    # A saturated engine still queues work: better than failing when every hosted
    # target has failed too, so it stays at the end of the plan.
    targets = [b for _, b in ready] + hosted + [b for _, b in saturated]

    if not targets:
        return RoutePlan((), "none", tuple(skipped), _refusal(facts, skipped))
    first = targets[0]
    if first.route == "local":
        reason = "forced" if facts.force == "local" else (
            "local-ok" if ready else "local-saturated")
    else:
        reason = _hosted_reason(skipped, backends)
    return RoutePlan(tuple(targets), reason, tuple(skipped))


def _unfit(facts: RequestFacts, b: Backend) -> tuple[str, str] | None:
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
    return None


def _hosted_reason(skipped: list[Skip], backends: Sequence[Backend]) -> str:
    if not any(b.route == "local" for b in backends):
        return "hosted-only"
    reasons = {s.reason for s in skipped}
    for r in _LOCAL_REASONS:
        if r in reasons:
            return r
    return "local-down"


def _refusal(facts: RequestFacts, skipped: list[Skip]) -> Refusal:
    reasons = {s.reason for s in skipped}
    if "license" in reasons and not facts.onprem_only:
        titles = sorted({s.detail for s in skipped if s.reason == "license"})
        return Refusal(403, "license", "no backend may serve this use: " + "; ".join(titles))
    if "residency" in reasons or (facts.onprem_only and "license" in reasons):
        detail = "the request must stay on-prem and no local engine can take it now"
        if "license" in reasons:
            detail = "the request must stay on-prem and the local weights' licence forbids it"
            return Refusal(403, "license", detail)
        return Refusal(503, "residency", detail)
    if reasons <= {"capability"}:
        return Refusal(400, "unsupported", f"{facts.alias} does not serve {facts.endpoint}")
    if "context-length" in reasons and reasons <= {"context-length", "capability", "forced"}:
        return Refusal(400, "context_length_exceeded",
                       "the prompt plus max_tokens exceed every backend's context length")
    if "forced" in reasons and reasons <= {"forced", "capability"}:
        return Refusal(400, "route_unavailable",
                       f"no {facts.force} backend serves {facts.alias}")
    return Refusal(503, "no_backend", "no backend can serve this request now")


def _worst_case_cost(b: Backend, facts: RequestFacts) -> float:
    if b.price is None:
        return 0.0
    # With no max_tokens the output side still counts: a typical answer's length.
    return b.price.cost(max(1, facts.prompt_tokens), facts.max_tokens or 256)


def _load_text(s: EngineLoad) -> str:
    parts = [f"inflight={s.inflight}"]
    if s.waiting is not None:
        parts.append(f"waiting={s.waiting:g}")
    if s.kv_cache is not None:
        parts.append(f"kv={s.kv_cache:.2f}")
    return " ".join(parts)
