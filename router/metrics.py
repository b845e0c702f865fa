"""Prometheus metrics of the gateway, in a registry owned by the app (no global state).

Counters and histograms are updated as each call ends; engine load, breakers and budgets
are read at scrape time, so /metrics is never staler than the router itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.routing.call import Call

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BREAKER_STATE = {"closed": 0, "half-open": 1, "open": 2}


class _Live(Collector):
    """Gauges computed from the running parts at scrape time."""

    def __init__(self, engines: Callable[[], Mapping[str, Mapping[str, object]]],
                 breakers: Callable[[], Mapping[str, Mapping[str, object]]],
                 budgets: Callable[[], Mapping[str, object]],
                 today: Callable[[], Mapping[str, float]],
                 ledger: Callable[[], Mapping[str, object]] | None = None) -> None:
        self._engines, self._breakers = engines, breakers
        self._budgets, self._today = budgets, today
        self._ledger = ledger

    def collect(self) -> Iterable[Metric]:
        gauges = {
            key: GaugeMetricFamily(f"spillover_engine_{key}", text, labels=["engine", "alias"])
            for key, text in (
                ("waiting", "Requests waiting in the engine's queue (vLLM metrics)"),
                ("running", "Requests running in the engine (vLLM metrics)"),
                ("kv_cache", "KV-cache use of the engine, 0..1 (vLLM metrics)"),
                ("inflight", "Requests the router has in flight to the engine"),
                ("saturated", "1 when the engine counts as saturated"),
                ("healthy", "1 when the engine answers its health check"),
                ("tokens_per_s", "Generation throughput the engine delivers"),
            )
        }
        for name, e in self._engines().items():
            labels = [name, str(e.get("alias", ""))]
            for key, g in gauges.items():
                v = e.get(key)
                if isinstance(v, (int, float)):  # bools too: 1.0 / 0.0
                    g.add_metric(labels, float(v))
        yield from gauges.values()

        breaker = GaugeMetricFamily("spillover_breaker_state",
                                    "Circuit breaker per upstream: 0 closed, 1 half-open, "
                                    "2 open", labels=["upstream"])
        for name, b in self._breakers().items():
            breaker.add_metric([name], _BREAKER_STATE.get(str(b.get("state")), 0))
        yield breaker

        left = GaugeMetricFamily("spillover_budget_left_usd",
                                 "Hosted budget left in the window (absent when unlimited)",
                                 labels=["scope", "window"])
        spent = GaugeMetricFamily("spillover_budget_spent_usd",
                                  "Hosted spend in the budget window",
                                  labels=["scope", "window"])
        snap = self._budgets()
        scopes: dict[str, object] = {"global": snap.get("global")}
        callers = snap.get("callers")
        if isinstance(callers, dict):
            scopes.update({f"caller:{k}": v for k, v in callers.items()})
        for scope, windows in scopes.items():
            if not isinstance(windows, dict):
                continue
            for window, w in windows.items():
                if not isinstance(w, dict):
                    continue
                if isinstance(w.get("left"), (int, float)):
                    left.add_metric([scope, window], float(w["left"]))
                if isinstance(w.get("spent"), (int, float)):
                    spent.add_metric([scope, window], float(w["spent"]))
        yield left
        yield spent

        share = GaugeMetricFamily("spillover_local_share",
                                  "Share of today's served requests that ran locally (UTC day)")
        share.add_metric([], float(self._today().get("local_share", 0.0)))
        yield share
        if self._ledger is not None:
            yield from _ledger_metrics(self._ledger())


def _ledger_metrics(state: Mapping[str, object]) -> Iterable[Metric]:
    """The ledger store's state (see router.accounting.ledger_spool.StoreHealth.snapshot)."""
    def number(key: str) -> float:
        v = state.get(key)
        return float(v) if isinstance(v, (int, float)) else 0.0

    for name, text, value in (
        ("spillover_ledger_store_up", "1 while the ledger's store takes writes, 0 while it "
         "fails", 0.0 if state.get("state") == "failing" else 1.0),
        ("spillover_ledger_failing_seconds", "How long the ledger's store has been failing "
         "(0 when it works)", number("failing_for_s")),
        ("spillover_ledger_refusing", "1 while new calls are refused for want of a ledger",
         1.0 if state.get("refusing") else 0.0),
        ("spillover_ledger_spooled_rows", "Rows of answered calls kept in the spool, "
         "waiting for the store", number("spooled_rows")),
        ("spillover_ledger_spool_bytes", "Size of the spool", number("spool_bytes")),
    ):
        g = GaugeMetricFamily(name, text)
        g.add_metric([], value)
        yield g
    for name, text, key in (
        ("spillover_ledger_rows_spooled", "Rows kept in the spool because the store failed",
         "rows_spooled_total"),
        ("spillover_ledger_rows_lost", "Rows neither the store nor the spool could keep",
         "rows_lost_total"),
    ):
        c = CounterMetricFamily(name, text)
        c.add_metric([], number(key))
        yield c


class Metrics:
    def __init__(self, aliases: Iterable[str]) -> None:
        # Label values come only from the catalog: a caller inventing model names must not
        # grow the registry without bound.
        self._aliases = frozenset(aliases)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # reason: a token of router.routing.reasons, or the error code of a request refused
        # before routing; both closed sets, so the label cannot grow without bound either.
        self.requests = Counter("spillover_requests", "Requests by outcome",
                                ["alias", "route", "backend", "reason", "status", "priority"],
                                registry=r)
        # By API surface (chat, completions, fim, embeddings, messages, responses,
        # batches): which clients the gateway serves, how each fares, what each costs.
        self.api_requests = Counter("spillover_api_requests", "Requests by API and outcome",
                                    ["api", "route", "status"], registry=r)
        self.api_tokens = Counter("spillover_api_tokens", "Tokens by API and kind",
                                  ["api", "kind"], registry=r)
        self.api_cost = Counter("spillover_api_cost_usd", "What calls cost, by API",
                                ["api"], registry=r)
        self.latency = Histogram("spillover_request_latency_seconds",
                                 "Time from request to the end of the response",
                                 ["route", "priority"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("spillover_time_to_first_token_seconds",
                              "Time from request to the first byte of the answer",
                              ["route", "priority"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("spillover_tokens", "Tokens by kind",
                              ["alias", "route", "kind"], registry=r)
        self.cost = Counter("spillover_cost_usd", "What calls cost (hosted price or local "
                            "GPU cost)", ["caller", "route"], registry=r)
        self.saving = Counter("spillover_saving_usd", "Hosted price minus the real cost",
                              ["caller", "route"], registry=r)
        # Tiered aliases: calls by tier (a plain alias of the catalog) and why that tier
        # (a closed set: none, score, sticky, pinned, capped, lower, cascade-<trigger>),
        # what each tier cost, and what the cascade threw away.
        self.tier_requests = Counter("spillover_tier_requests",
                                     "Calls of tiered aliases by tier and reason",
                                     ["tier", "reason"], registry=r)
        self.tier_cost = Counter("spillover_tier_cost_usd", "What calls of each tier cost",
                                 ["tier"], registry=r)
        self.tier_wasted = Counter("spillover_tier_wasted_usd",
                                   "What answers the cascade re-sent one tier up cost",
                                   ["tier", "trigger"], registry=r)

        # Labelled children by label values: `labels()` locks and rebuilds its key on
        # every call, which showed in the hot path's profile. Bounded like the registry.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_aliases(self, aliases: Iterable[str]) -> None:
        self._aliases = frozenset(aliases)

    def watch(self, engines: Callable[[], Mapping[str, Mapping[str, object]]],
              breakers: Callable[[], Mapping[str, Mapping[str, object]]],
              budgets: Callable[[], Mapping[str, object]],
              today: Callable[[], Mapping[str, float]],
              *, ledger: Callable[[], Mapping[str, object]] | None = None) -> None:
        self.registry.register(_Live(engines, breakers, budgets, today, ledger))

    def observe(self, call: Call) -> None:
        route = call.route or "none"
        alias = call.facts.alias if call.facts.alias in self._aliases else "other"
        child = self._child
        priority = call.facts.priority
        child(self.requests, alias, route, call.backend or "", call.reason,
              str(call.status), priority).inc()
        api = call.inbound_api()
        child(self.api_requests, api, route, str(call.status)).inc()
        if call.tier is not None and call.tier in self._aliases:
            reason = (call.escalation or "").partition(";")[0]
            child(self.tier_requests, call.tier, reason).inc()
            if call.cost_usd:
                child(self.tier_cost, call.tier).inc(call.cost_usd)
                if call.wasted:
                    child(self.tier_wasted, call.tier, call.wasted).inc(call.cost_usd)
        if call.route is None:
            return
        child(self.latency, route, priority).observe(call.elapsed())
        if call.ttft_s is not None:
            child(self.ttft, route, priority).observe(call.ttft_s)
        if call.prompt_tokens:
            child(self.tokens, alias, route, "prompt").inc(call.prompt_tokens)
            child(self.api_tokens, api, "prompt").inc(call.prompt_tokens)
        if call.completion_tokens:
            child(self.tokens, alias, route, "completion").inc(call.completion_tokens)
            child(self.api_tokens, api, "completion").inc(call.completion_tokens)
        if call.cost_usd:
            child(self.cost, call.caller, route).inc(call.cost_usd)
            child(self.api_cost, api).inc(call.cost_usd)
        if call.hosted_equiv_usd is not None:
            saving = call.hosted_equiv_usd - (call.cost_usd or 0.0)
            if saving > 0:
                child(self.saving, call.caller, route).inc(saving)

    def render(self) -> bytes:
        return generate_latest(self.registry)
