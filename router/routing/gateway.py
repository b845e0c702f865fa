"""One request, start to finish: who calls, what it asks, where it goes, then dispatch."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope

from router.accounting.budgets import Budgets
from router.accounting.recorder import Recorder
from router.config import PRIORITIES, Config, Endpoint, Priority
from router.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    SpilloverError,
    Unavailable,
)
from router.http.inbound import facts_for, priority_header, read_json, session_header
from router.http.streaming import EventStream
from router.routing.auth import Authenticator, Principal
from router.routing.call import UNKNOWN_ALIAS, Call
from router.routing.catalog import Backend, Catalog
from router.routing.dispatch import Dispatcher
from router.routing.load import LoadMonitor
from router.routing.policy import RequestFacts, RoutePlan, decide
from router.routing.ratelimit import RateLimiter, StreamSlots
from router.routing.reasons import ErrorCode, is_reason
from router.routing.replicas import conversation_key, session_key
from router.routing.resilience import Breakers
from router.routing.tiers import TierDecision, Tiers, cascade_trigger
from router.routing.tracing import Tracing

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def header_map(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers, decoded once into a dict (ASGI names are lower-case); the
    first of repeated headers wins, as with Starlette's `Headers.get`, except the policy
    headers (x-spillover-*): their repeated values are joined with commas, as HTTP
    combines list headers, so that inbound.facts_for sees every one (an `onprem` a proxy
    appends must not lose to the caller's `any`)."""
    out = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(raw)}
    if len(out) != len(raw):  # something repeated: rare, so the common path stays one pass
        seen: dict[str, list[str]] = {}
        for k, v in raw:
            name = k.decode("latin-1")
            if name.startswith("x-spillover-"):
                seen.setdefault(name, []).append(v.decode("latin-1"))
        out.update((name, ",".join(values)) for name, values in seen.items()
                   if len(values) > 1)
    return out


def request_id(headers: Mapping[str, str]) -> str:
    # A caller's id is reused only when it is safe to echo into headers and logs.
    rid = headers.get("x-request-id")
    if rid and _REQUEST_ID.fullmatch(rid):
        return rid
    return os.urandom(16).hex()  # uuid4's randomness without building a UUID


@dataclass(frozen=True, slots=True)
class Planned:
    principal: Principal
    facts: RequestFacts
    backends: tuple[Backend, ...]
    plan: RoutePlan
    tier: TierDecision | None = None  # a tiered alias: the tier chosen, and why
    raw: RequestFacts | None = None  # the request as read, before the caller's policy


class Gateway:
    def __init__(self, config: Config, catalog: Catalog, monitor: LoadMonitor,
                 dispatcher: Dispatcher, *, auth: Authenticator, budgets: Budgets,
                 limiter: RateLimiter, breakers: Breakers, recorder: Recorder,
                 streams: StreamSlots | None = None,
                 keyless: Mapping[str, str] | None = None,
                 tiers: Tiers | None = None, tracing: Tracing | None = None) -> None:
        self.config = config
        self.catalog = catalog
        self.monitor = monitor
        self.dispatcher = dispatcher
        self.auth = auth
        self.budgets = budgets
        self.limiter = limiter
        self.breakers = breakers
        self.recorder = recorder
        # Hosted backends whose API key variable is not set -> that variable's name.
        self.keyless: Mapping[str, str] = keyless or {}
        self.streams = streams if streams is not None else StreamSlots()
        self.tiers = tiers if tiers is not None else Tiers(config)
        self.tracing = tracing  # None when OTEL_* asks for no traces: one test a request

    async def handle(self, endpoint: Endpoint, scope: Scope, receive: Receive, *,
                     api: str | None = None,
                     prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                     priority: Priority | None = None,
                     as_caller: Principal | None = None, batch_id: str = "",
                     ) -> Response:
        """`api` names another API surface for the ledger and metrics (e.g. "messages");
        `prepare` turns its body into the `endpoint`'s body, after authentication;
        `priority` is the class a trusted in-process caller (the batch scheduler) sets in
        place of x-spillover-priority, still within the caller's max_priority."""
        started = time.monotonic()
        headers = header_map(scope["headers"])
        call = Call(request_id=request_id(headers), facts=RequestFacts("", endpoint),
                    started=started, deadline=started + self.config.server.request_timeout_s)
        call.api = api
        if self.tracing is not None:
            call.trace = self.tracing.start(endpoint, headers, api)
        # The batch scheduler runs a line for the caller that uploaded it, who authenticated
        # then: no key is kept, so it names the caller instead of sending its key.
        call.batch_id = batch_id
        stream_slot: Callable[[], None] | None = None
        routed = False
        try:
            principal = as_caller or self.auth.caller(headers)
            call.caller = principal.name
            body = await read_json(receive, self.config.server.max_body_bytes, headers)
            if prepare is not None:
                call.native = body
                body = prepare(body)
            # The caller's text is kept only when it names an alias: anything else would
            # reach the ledger, its CSV export and the dashboard as typed (a formula, say).
            model = body.get("model")
            call.facts = RequestFacts(
                model if isinstance(model, str) and (self.catalog.backends(model) is not None
                                                     or model in self.tiers)
                else UNKNOWN_ALIAS, endpoint)
            p = self.plan(principal, endpoint, body, headers, priority=priority)
            call.facts = p.facts
            call.session_key = _session_key(principal.name, headers)
            cascade_to = None if p.tier is None else self._tiered(call, p, body)
            call.wants_usage = _caller_wants_usage(body)
            worst = p.facts.tokens_max
            allowed = self.limiter.tokens_per_minute(principal.name)
            if allowed is not None and worst > allowed:
                # Waiting cannot help a request larger than a whole minute's allowance.
                raise InvalidRequest(
                    f"this request may use up to {worst} tokens (prompt at most "
                    f"{p.facts.prompt_tokens_max}, plus {p.facts.choices} x max_tokens "
                    f"{p.facts.max_tokens or p.facts.assumed_max_tokens}), over caller "
                    f"'{principal.name}''s {allowed} tokens a minute: lower max_tokens or n",
                    param="max_tokens", code="tokens_per_minute_exceeded")
            admitted = self.limiter.admit(principal.name, worst)
            if isinstance(admitted, float):
                raise RateLimited(f"caller '{principal.name}' is over its rate limit",
                                  headers={"retry-after": str(math.ceil(admitted))})
            call.admission = admitted
            if p.facts.stream:
                stream_slot = self.streams.take(principal.name,
                                                principal.policy.max_concurrent_streams)
                if stream_slot is None:
                    raise RateLimited(
                        f"caller '{principal.name}' already holds "
                        f"{principal.policy.max_concurrent_streams} streams open, its limit",
                        code="too_many_streams", headers={"retry-after": "1"})
            routed = True
            plan = await self._wait_for_local(call, p)
            if plan.refusal is not None:
                raise _refused(plan)
        except SpilloverError as err:
            if stream_slot is not None:
                stream_slot()
            call.status = err.status
            token = err.headers.get("x-spillover-reason", "")
            call.reason = token if is_reason(token) else ErrorCode(err.code or err.type)
            err.headers.setdefault("x-request-id", call.request_id)
            if routed:  # a routing decision (budget, residency, licence...): the ledger's
                err.headers.setdefault("x-spillover-priority", call.facts.priority)
                await self.recorder.finish(call)
            else:  # 6,000 keyless requests wrote 6,000 rows: counted, not written
                self.recorder.refuse(call)
            if call.trace is not None:
                call.trace.end(call)
            raise
        if p.tier is not None:
            self.tiers.remember(p.tier)
        if stream_slot is None:
            response = await self.dispatcher.run(call, plan, body)
            if call.wasted is not None and cascade_to is not None:
                return await self._cascade(call, cascade_to, body, response)
            return response
        try:
            response = await self.dispatcher.run(call, plan, body)
        except BaseException:
            stream_slot()
            raise
        if isinstance(response, EventStream):
            response.on_close(stream_slot)  # held until the stream ends, however it ends
        else:
            stream_slot()  # refused or failed before the first byte: no stream
        return response

    def plan(self, principal: Principal, endpoint: Endpoint, body: dict[str, Any],
             headers: Mapping[str, str], *, priority: Priority | None = None) -> Planned:
        """The decision for this request now, without calling anything. `priority`: the
        class to use instead of the x-spillover-priority header (see handle)."""
        raw = facts_for(endpoint, body, headers)
        backends = self.catalog.backends(raw.alias)
        policy = principal.policy
        tiered = backends is None and raw.alias in self.tiers
        if (backends is None and not tiered) or (policy.aliases is not None
                                                 and raw.alias not in policy.aliases):
            # Not allowed answers exactly like not there: a caller cannot probe for the
            # aliases of others.
            raise NotFound(f"The model '{raw.alias[:100]}' does not exist; GET /v1/models lists "
                           "the models this gateway serves", param="model",
                           code="model_not_found")
        if raw.force != "auto" and not policy.may_force_route:
            raise Forbidden(f"caller '{principal.name}' may not force the route",
                            param="x-spillover-route", code="route_not_allowed")
        cls = _priority(principal, priority if priority is not None
                        else priority_header(headers))
        if backends is None:
            return self._plan_tiered(principal, endpoint, raw, cls, body, headers)
        return self._plan_alias(principal, raw, cls, raw.alias, backends)

    def _plan_tiered(self, principal: Principal, endpoint: Endpoint, raw: RequestFacts,
                     cls: Priority, body: dict[str, Any],
                     headers: Mapping[str, str]) -> Planned:
        """The tier first, then that tier's own plan; a tier that cannot take the request
        (no key for the flagship, residency, budget) gives way to the highest one below
        that can, unless the alias says refuse or the caller pinned it."""
        d = self.tiers.decide(raw.alias, principal.name, principal.policy, endpoint, body,
                              headers)
        chosen = self._plan_alias(principal, raw, cls, d.tier, self._tier_backends(d.tier), d)
        if (chosen.plan.refusal is None or d.reason == "pinned"
                or self.tiers.alias(d.tiered).unusable_tier == "refuse"):
            return chosen
        for index in range(d.index - 1, -1, -1):
            low = self.tiers.lowered(d, index)
            p = self._plan_alias(principal, raw, cls, low.tier, self._tier_backends(low.tier),
                                 low)
            if p.plan.refusal is None:
                return p
        return chosen

    def _tier_backends(self, alias: str) -> tuple[Backend, ...]:
        backends = self.catalog.backends(alias)
        assert backends is not None  # config validation: every tier is a plain alias
        return backends

    def _plan_alias(self, principal: Principal, raw: RequestFacts, cls: Priority, name: str,
                    backends: tuple[Backend, ...], tier: TierDecision | None = None) -> Planned:
        policy = principal.policy
        alias = self.config.aliases[name]
        ceilings = [x for x in (policy.max_request_usd, self.config.budget.max_request_usd)
                    if x is not None]
        # Built whole rather than with dataclasses.replace, which costs as much as the
        # routing decision itself on this path.
        facts = RequestFacts(
            alias=name, endpoint=raw.endpoint, stream=raw.stream,
            max_tokens=raw.max_tokens, prompt_tokens=raw.prompt_tokens, force=raw.force,
            prompt_tokens_max=raw.prompt_tokens_max, choices=raw.choices,
            assumed_max_tokens=self.config.routing.default_max_tokens,
            onprem_only=raw.onprem_only or policy.residency == "onprem",
            commercial_use=policy.use == "commercial",
            # Work that can wait waits for a local engine before it spills.
            mode=(policy.mode or alias.mode or self.config.routing.mode
                  if cls == "interactive" else "cost-first"),
            priority=cls,
            # The caller's own limit and the per-request ceiling on a reservation.
            max_request_usd=min(ceilings) if ceilings else None,
            # A planning hint: with PostgreSQL it reads a view refreshed in the background
            # (no round trip here); the reservation before a hosted attempt is the check.
            # An alias with no hosted offering has nothing to spend it on.
            hosted_allowance_usd=(self.budgets.allowance(principal.name)
                                  if any(b.route == "hosted" for b in backends) else None),
        )
        return Planned(principal, facts, backends, self._decide(facts, backends), tier, raw)

    def _tiered(self, call: Call, p: Planned, body: dict[str, Any]) -> Planned | None:
        """Marks the call with its tier; the next tier's plan when the cascade may re-send
        this (non-streamed) request there, with the check of the answer that decides it."""
        d = p.tier
        assert d is not None and p.raw is not None
        call.tier, call.tier_score, call.escalation = d.tier, d.score, d.header()
        cfg = self.tiers.cascade(d.tiered)
        if (p.facts.stream or p.facts.endpoint != "chat" or not cfg.enabled
                or d.reason == "pinned" or p.plan.refusal is not None):
            return None
        up = self.tiers.next_up(d, p.principal.policy)
        if up is None:
            return None
        nxt = self._plan_alias(p.principal, p.raw, p.facts.priority, up.tier,
                               self._tier_backends(up.tier), up)
        if nxt.plan.refusal is not None:
            return None  # the tier above cannot take it now: the answer stands as it is
        call.inspect = lambda answer: cascade_trigger(cfg, body, answer)
        return nxt

    async def _cascade(self, first: Call, nxt: Planned, body: dict[str, Any],
                       answer: Response) -> Response:
        """The lower tier's answer failed its check: the request goes one tier up; the
        caller gets that answer only, and both calls are booked (the first as wasted)."""
        d = nxt.tier
        assert d is not None
        call = Call(request_id=first.request_id, facts=nxt.facts, started=first.started,
                    deadline=first.deadline, caller=first.caller,
                    wants_usage=first.wants_usage, session_key=first.session_key)
        call.api, call.native = first.api, first.native  # Messages stay native to Claude
        call.tier, call.tier_score = d.tier, d.score
        call.escalation = f"cascade-{first.wasted}; score={d.score:.3f}; from={first.tier}"
        if first.trace is not None:  # one more attempt under the request's span
            first.trace.escalate(call)
        plan = await self._wait_for_local(call, nxt)
        if plan.refusal is not None:
            if first.trace is not None:
                first.trace.end(first)
            return answer
        self.tiers.remember(d)
        return await self.dispatcher.run(call, plan, body)

    def _decide(self, facts: RequestFacts, backends: tuple[Backend, ...]) -> RoutePlan:
        return decide(facts, backends, self.monitor.view(b.name for b in backends),
                      self.breakers.unavailable(), keyless=self.keyless,
                      retry_in=self.breakers.waits())

    async def _wait_for_local(self, call: Call, p: Planned) -> RoutePlan:
        """Cost-first requests, and those that may only run locally, wait a bounded time
        for a saturated engine to take them; each change of load re-decides."""
        plan = p.plan
        if not plan.wait_for_local:
            return plan
        routing = self.config.routing
        onprem = p.facts.onprem_only
        bound = (routing.batch_max_wait_s if p.facts.priority == "batch"
                 else routing.residency_max_wait_s if onprem else routing.cost_first_max_wait_s)
        t0 = time.monotonic()
        until = min(call.deadline - 0.05, t0 + bound)
        facts = p.facts
        while plan.wait_for_local and (left := until - time.monotonic()) > 0:
            await self.monitor.wait_change(left)
            facts = dataclasses.replace(
                facts, hosted_allowance_usd=self.budgets.allowance(p.principal.name))
            plan = self._decide(facts, p.backends)
        call.facts = facts
        call.waited_s = time.monotonic() - t0
        if facts.mode == "cost-first" and plan.refusal is None and not facts.onprem_only:
            local = plan.route == "local"
            plan = dataclasses.replace(
                plan, reason="cost-first-waited" if local else "cost-first-spill")
        return plan

    def explain(self, principal: Principal, endpoint: Endpoint, body: dict[str, Any],
                headers: Mapping[str, str]) -> dict[str, Any]:
        p = self.plan(principal, endpoint, body, headers)
        f, plan = p.facts, p.plan
        mine = {b.name for b in p.backends}
        refusal = plan.refusal
        return {
            "caller": principal.name,
            "request": {
                "alias": f.alias, "endpoint": f.endpoint, "stream": f.stream,
                "max_tokens": f.max_tokens, "prompt_tokens_estimate": f.prompt_tokens,
                "prompt_tokens_max": f.prompt_tokens_max, "choices": f.choices,
                "output_tokens_max": f.output_tokens_max,
                "force": f.force, "onprem_only": f.onprem_only,
                "use": principal.policy.use, "mode": f.mode, "priority": f.priority,
                "max_priority": principal.policy.max_priority,
                "max_request_usd": f.max_request_usd,
                # The caller's own limits only: the global allowance is nobody's business,
                # and knowing it is how one caller would size a request to hold all of it.
                "caller_allowance_usd": self.budgets.caller_allowance(principal.name),
            },
            # A tiered alias: how its tier was chosen; what follows is that tier's plan.
            "tier": None if p.tier is None else _tier_explained(p.tier),
            "candidates": [_candidate(b, f) for b in p.backends],
            "filtered": [{"backend": s.backend, "reason": s.reason, "detail": s.detail}
                         for s in plan.skipped],
            # Only this alias's engines and upstreams: nothing of the other aliases'.
            "load": {name: e for name, e in self.monitor.status().items()
                     if name.partition("@")[0] in mine},
            "breakers": {name: b for name, b in self.breakers.snapshot().items()
                         if name in mine or name.partition("@")[0] in mine},
            "plan": {
                "route": plan.route,
                "reason": plan.reason,
                "targets": [b.name for b in plan.targets],
                "would_wait_for_local": plan.wait_for_local,
                # Deployments with replicas: which one this conversation would go to, why.
                "replicas": self._replicas_explained(
                    principal.name, body, plan.targets, _session_key(principal.name, headers)),
                "refusal": None if refusal is None else {
                    "status": refusal.status, "code": refusal.code,
                    "message": refusal.message},
            },
        }

    def _replicas_explained(self, caller: str, body: dict[str, Any],
                            targets: Sequence[Backend], session: str | None,
                            ) -> dict[str, Any]:
        key = session or conversation_key(caller, body)
        # What keeps the conversation together: the caller's session header, the body's
        # opening, or nothing (least-loaded).
        by = "session" if session else None if key is None else "conversation"
        out: dict[str, Any] = {}
        for b in targets:
            if b.route == "local" and b.discover is not None:
                picked = self.monitor.pick(b.name, key)
                # The siblings a failure before the first byte would move the request to,
                # in order, before the plan's next target (dispatch's sibling retry).
                tried = [] if picked is None else [picked[0]]
                while 0 < len(tried) < self.config.routing.attempts_per_target and (
                        nxt := self.monitor.pick(b.name, key, tried=tried)) is not None:
                    tried.append(nxt[0])
                out[b.name] = None if picked is None else {
                    "replica": picked[0], "why": picked[2].why, "affinity": key is not None,
                    "key": by, "failover": tried[1:]}
        return out


def _session_key(caller: str, headers: Mapping[str, str]) -> str | None:
    session = session_header(headers)
    return None if session is None else session_key(caller, session)


def _tier_explained(d: TierDecision) -> dict[str, Any]:
    return {"alias": d.tiered, "scorer": d.scorer, "features": d.parts,
            "score": round(d.score, 4), "thresholds": list(d.thresholds),
            "scored_tier": d.scored_index + 1, "chosen": d.tier, "chosen_tier": d.index + 1,
            "reason": d.reason}


def _candidate(b: Backend, f: RequestFacts) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": b.name, "route": b.route, "label": b.label,
                           "model": b.model_id, "endpoints": sorted(b.endpoints)}
    if b.license is not None:
        out["license"] = {"id": b.license_id, "title": b.license.title,
                          "commercial": b.license.commercial}
    if b.price is not None:
        out["price_per_mtok"] = {"input": b.price.input_per_mtok,
                                 "output": b.price.output_per_mtok}
        out["worst_case_usd"] = round(f.worst_case_usd(b), 6)
    return out


def _priority(principal: Principal, asked: Priority | None) -> Priority:
    """The request's class: the caller's default, or a class asked for within its
    max_priority (lowering is always allowed, raising past it never)."""
    policy = principal.policy
    if asked is None:
        return policy.default_priority
    if PRIORITIES.index(asked) < PRIORITIES.index(policy.max_priority):
        allowed = ", ".join(PRIORITIES[PRIORITIES.index(policy.max_priority):])
        raise Forbidden(f"caller '{principal.name}' may not send {asked} traffic: its "
                        f"classes are {allowed}", param="x-spillover-priority",
                        code="priority_not_allowed")
    return asked


def _caller_wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _refused(plan: RoutePlan) -> SpilloverError:
    r = plan.refusal
    assert r is not None
    headers: dict[str, str] = {"x-spillover-reason": r.code}
    if r.retry_after_s is not None:
        headers["retry-after"] = str(r.retry_after_s)
    if r.status == 403:
        return Forbidden(r.message, code=r.code, headers=headers)
    if r.status == 429:
        return RateLimited(r.message, code=r.code, headers=headers)
    if r.status == 503:
        return Unavailable(r.message, code=r.code, headers=headers)
    return InvalidRequest(r.message, code=r.code, headers=headers)
