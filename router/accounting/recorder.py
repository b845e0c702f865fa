"""What happens once a call has ended: rate limits trued up, one structured log line,
the live counters, and one ledger row, durable before the response finishes."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from router.accounting.ledger import CallLedger, LedgerError, LedgerRow, StoreUnavailable
from router.routing.call import Call

access = logging.getLogger("spillover.access")
log = logging.getLogger("spillover.recorder")


BUCKET_S = 10
REFUSED_LOG_EVERY_S = 10.0  # at most one line this often about calls refused before routing
BUCKETS = 90  # 15 minutes of history for the dashboard


class Recorder:
    def __init__(self, ledger: CallLedger | None = None, recent: int = 50,
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.observers: list[Callable[[Call], None]] = []
        self._clock = clock
        # The latest decisions, for the status API and the dashboard.
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        # [bucket start, local, hosted, errors], oldest first.
        self._series: deque[list[float]] = deque(maxlen=BUCKETS)
        self._day = -1
        # Refusals since the last sampled log line about them, and when that was.
        self._refused = 0
        self._refused_logged = -math.inf
        self._today = dict.fromkeys(_TODAY, 0.0)
        # Tiered aliases today, per tier: [calls, cost, escalated calls, their cost,
        # wasted calls, their cost]; the reasons behind the calls (a closed set).
        self._tiers: dict[str, list[float]] = {}
        self._tier_reasons: dict[str, int] = {}
        # Today per inbound API (Call.inbound_api): [calls, errors, prompt tokens,
        # completion tokens, cost].
        self._apis: dict[str, list[float]] = {}

    async def finish(self, call: Call) -> None:
        row = self._close(call)
        if self.ledger is not None:
            try:
                await self.ledger.record(row)
            except StoreUnavailable:
                pass  # counted, and said once for the whole outage, by the store's health
            except LedgerError as exc:
                # The caller still gets its answer; the operator gets a loud log line.
                log.error("ledger write failed for request %s: %s", call.request_id, exc)

    def finish_nowait(self, call: Call) -> None:
        """For calls that end where nothing can wait (a stream whose caller went away)."""
        row = self._close(call)
        if self.ledger is not None:
            try:
                self.ledger.record_nowait(row)
            except LedgerError as exc:
                log.error("ledger write failed for request %s: %s", call.request_id, exc)

    def refusal(self) -> str | None:
        """Why new calls must be refused (a ledger that can keep no rows, or set to refuse
        while its store fails); None while they may be served."""
        return None if self.ledger is None else self.ledger.health.refusal()

    def refuse(self, call: Call) -> None:
        """A call refused before routing (no or a bad key, bad input, a caller's limits):
        counted by the observers (the metrics, by status and reason), neither a ledger row
        nor a latest decision nor an access line each, so that a flood of keyless requests
        costs neither disk nor the dashboard; a sampled log line says how many there were."""
        if call.admission is not None:
            call.admission.settle(0)
            call.admission = None
        for observe in self.observers:
            observe(call)
        self._refused += 1
        now = self._clock()
        if now - self._refused_logged >= REFUSED_LOG_EVERY_S and access.isEnabledFor(
                logging.INFO):
            access.info("%s", orjson.dumps({
                "refused_before_routing": self._refused, "since_s": round(
                    min(now - self._refused_logged, 1e9), 1),
                "last": {"request_id": call.request_id, "status": call.status,
                         "reason": call.reason}}).decode())
            self._refused, self._refused_logged = 0, now

    def _close(self, call: Call) -> LedgerRow:
        if call.admission is not None:
            call.admission.settle(call.prompt_tokens + call.completion_tokens)
            call.admission = None
        line = entry(call)
        self.recent.appendleft(line)
        self._count(call)
        for observe in self.observers:
            observe(call)
        if access.isEnabledFor(logging.INFO):
            access.info("%s", orjson.dumps(line).decode())
        return LedgerRow(
            ts=call.wall_started, request_id=call.request_id, caller=call.caller,
            alias=call.facts.alias, route=call.route or "", backend=call.backend or "",
            model_id=call.model_id or "", prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens, cost_usd=call.cost_usd or 0.0,
            hosted_equiv_usd=call.hosted_equiv_usd or 0.0,
            latency_s=line["latency_ms"] / 1000, ttft_s=call.ttft_s, status=call.status,
            reason=call.reason, endpoint=call.api or call.facts.endpoint, batch_id=call.batch_id,
            priority=call.facts.priority,
            tier=call.tier or "", score=call.tier_score,
            escalation=(call.escalation or "").partition(";")[0], wasted=call.wasted or "",
        )


    def _count(self, call: Call) -> None:
        now = self._clock()
        start = now - now % BUCKET_S
        if not self._series or self._series[-1][0] != start:
            self._series.append([start, 0, 0, 0])
        bucket = self._series[-1]
        day = int(now // 86400)
        if day != self._day:
            self._day, self._today = day, dict.fromkeys(_TODAY, 0.0)
            self._tiers, self._tier_reasons, self._apis = {}, {}, {}
        if call.tier is not None:
            self._count_tier(call)
        api = self._apis.get(call.inbound_api())
        if api is None:
            api = self._apis[call.inbound_api()] = [0.0] * 5
        api[0] += 1
        api[1] += call.status >= 400
        api[2] += call.prompt_tokens
        api[3] += call.completion_tokens
        api[4] += call.cost_usd or 0.0
        t = self._today
        t["requests"] += 1
        if call.status >= 400:
            bucket[3] += 1
            t["errors"] += 1
        elif call.route == "local":
            bucket[1] += 1
            t["local"] += 1
        elif call.route == "hosted":
            bucket[2] += 1
            t["hosted"] += 1
        cost = call.cost_usd or 0.0
        t["cost_usd"] += cost
        if call.route == "hosted":
            t["hosted_cost_usd"] += cost
        if call.hosted_equiv_usd is not None:
            t["saving_usd"] += call.hosted_equiv_usd - cost

    def _count_tier(self, call: Call) -> None:
        assert call.tier is not None
        tier = self._tiers.setdefault(call.tier, [0.0] * 6)
        cost = call.cost_usd or 0.0
        if call.wasted:  # an answer the cascade threw away: what escalation cost extra
            tier[4] += 1
            tier[5] += cost
            return
        reason = (call.escalation or "").partition(";")[0]
        self._tier_reasons[reason] = self._tier_reasons.get(reason, 0) + 1
        tier[0] += 1
        tier[1] += cost
        if reason in _ESCALATED or reason.startswith("cascade"):
            tier[2] += 1
            tier[3] += cost

    def tiers(self) -> dict[str, Any]:
        """Today's calls of tiered aliases (UTC day): per tier the answers served and
        their share, what they cost, how many were there because of an escalation (score,
        sticky conversation, cascade) and what those cost, and the cascade's wasted calls
        (lower-tier answers re-sent one tier up) with their cost."""
        served = sum(t[0] for t in self._tiers.values())
        per = {name: {"calls": t[0], "share": t[0] / served if served else 0.0,
                      "cost_usd": t[1], "escalated": t[2], "escalated_cost_usd": t[3],
                      "wasted": t[4], "wasted_usd": t[5]}
               for name, t in self._tiers.items()}
        return {"calls": served, "tiers": per, "reasons": dict(self._tier_reasons),
                "escalated": sum(t[2] for t in self._tiers.values()),
                "escalated_cost_usd": sum(t[3] for t in self._tiers.values()),
                "wasted": sum(t[4] for t in self._tiers.values()),
                "wasted_usd": sum(t[5] for t in self._tiers.values())}

    def apis(self) -> dict[str, dict[str, float]]:
        """Today's calls per inbound API (UTC day): calls, errors, tokens, cost."""
        return {name: {"requests": a[0], "errors": a[1], "prompt_tokens": a[2],
                       "completion_tokens": a[3], "cost_usd": a[4]}
                for name, a in sorted(self._apis.items())}

    def series(self) -> list[dict[str, float]]:
        return [{"t": b[0], "local": b[1], "hosted": b[2], "errors": b[3]}
                for b in self._series]

    def today(self) -> dict[str, float]:
        t = dict(self._today)
        served = t["local"] + t["hosted"]
        t["local_share"] = t["local"] / served if served else 0.0
        return t


# Why a call sits above the tier its alias would give everyone: escalations (cascade-* too).
_ESCALATED = frozenset({"score", "sticky"})
_TODAY = ("requests", "local", "hosted", "errors", "cost_usd", "hosted_cost_usd",
          "saving_usd")


def entry(call: Call) -> dict[str, Any]:
    out = _entry(call)
    if call.tier is not None:  # a tiered alias's call: which tier, why, and if wasted
        out.update(tier=call.tier, tier_score=call.tier_score,
                   escalation=(call.escalation or "").partition(";")[0], wasted=call.wasted)
    if call.upstream_api is not None:  # Messages/Responses: sent natively or as chat
        out["upstream_api"] = call.upstream_api
    return out


def _entry(call: Call) -> dict[str, Any]:
    return {
        "ts": round(call.wall_started, 3),
        "request_id": call.request_id,
        "caller": call.caller,
        "alias": call.facts.alias,
        "endpoint": call.api or call.facts.endpoint,
        "priority": call.facts.priority,
        "stream": call.facts.stream,
        "route": call.route,
        "backend": call.backend,
        "reason": call.reason,
        "status": call.status,
        "latency_ms": round(call.elapsed() * 1000, 1),
        "ttft_ms": None if call.ttft_s is None else round(call.ttft_s * 1000, 1),
        "waited_ms": round(call.waited_s * 1000, 1),
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "cost_usd": call.cost_usd,
        "hosted_equiv_usd": call.hosted_equiv_usd,
        "attempts": call.attempts,
        "usage_estimated": call.usage_estimated,
    }
