from __future__ import annotations

import time
from collections.abc import Mapping

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import CONTENT_TYPE, Metrics
from router.routing.call import Call
from router.routing.policy import RequestFacts

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(m: Metrics) -> Samples:
    text = m.render().decode("utf-8")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(s: Samples, name: str, **labels: str) -> float | None:
    return s.get((name, frozenset(labels.items())))


def series(s: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in s if n == name]


def call(
    alias: str = "demo",
    *,
    route: str | None = "local",
    backend: str | None = "demo-local",
    reason: str = "local-ok",
    status: int = 200,
    caller: str = "app",
    prompt: int = 0,
    completion: int = 0,
    cost: float | None = None,
    equiv: float | None = None,
    ttft: float | None = None,
    elapsed: float = 0.0,
) -> Call:
    now = time.monotonic()
    return Call(
        request_id="r", facts=RequestFacts(alias=alias, endpoint="chat"),
        started=now - elapsed, deadline=now + 60, caller=caller, route=route,
        backend=backend, reason=reason, status=status, prompt_tokens=prompt,
        completion_tokens=completion, cost_usd=cost, hosted_equiv_usd=equiv, ttft_s=ttft,
    )


REQ = "spillover_requests_total"


def req_labels(alias: str = "demo", route: str = "local", backend: str = "demo-local",
               reason: str = "local-ok", status: str = "200",
               priority: str = "interactive") -> dict[str, str]:
    return {"alias": alias, "route": route, "backend": backend, "reason": reason,
            "status": status, "priority": priority}


# -- requests ------------------------------------------------------------------------


def test_requests_counted_by_labels() -> None:
    m = Metrics(["demo", "code"])
    m.observe(call())
    m.observe(call())
    m.observe(call(status=502, reason="upstream-error"))
    m.observe(call("code", route="hosted", backend="mistral", reason="spill"))
    s = samples(m)
    assert value(s, REQ, **req_labels()) == 2
    assert value(s, REQ, **req_labels(status="502", reason="upstream-error")) == 1
    assert value(s, REQ, **req_labels("code", "hosted", "mistral", "spill")) == 1
    assert len(series(s, REQ)) == 3


def test_nothing_observed_renders_no_series() -> None:
    m = Metrics(["demo"])
    s = samples(m)
    for name in (REQ, "spillover_tokens_total", "spillover_cost_usd_total",
                 "spillover_request_latency_seconds_count"):
        assert series(s, name) == []
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@pytest.mark.parametrize("alias", ["gpt-4", "", "demo2", "DEMO", "x" * 128, "a\"b\\c\n"])
def test_unknown_alias_becomes_other(alias: str) -> None:
    m = Metrics(["demo"])
    m.observe(call(alias, prompt=3))
    s = samples(m)
    assert series(s, REQ) == [req_labels("other")]
    assert value(s, "spillover_tokens_total", alias="other", route="local", kind="prompt") == 3


def test_invented_aliases_do_not_grow_the_registry() -> None:
    m = Metrics(["demo"])
    for i in range(200):
        m.observe(call(f"model-{i}", prompt=1, completion=1))
    s = samples(m)
    assert series(s, REQ) == [req_labels("other")]
    assert value(s, REQ, **req_labels("other")) == 200
    assert len(series(s, "spillover_tokens_total")) == 2


def test_set_aliases_changes_what_counts_as_known() -> None:
    m = Metrics(["demo"])
    m.observe(call("new"))
    m.set_aliases(["demo", "new"])
    m.observe(call("new"))
    m.set_aliases([])
    m.observe(call("demo"))
    s = samples(m)
    assert value(s, REQ, **req_labels("other")) == 2
    assert value(s, REQ, **req_labels("new")) == 1
    assert value(s, REQ, **req_labels("demo")) is None


def test_refused_call_is_counted_without_latency_or_money() -> None:
    m = Metrics(["demo"])
    m.observe(call(route=None, backend=None, reason="rate_limit_exceeded", status=429,
                   prompt=10, completion=5, cost=0.5, equiv=1.0, ttft=0.1, elapsed=0.2))
    s = samples(m)
    assert series(s, REQ) == [req_labels(route="none", backend="", reason="rate_limit_exceeded",
                                         status="429")]
    for name in ("spillover_request_latency_seconds_count",
                 "spillover_time_to_first_token_seconds_count", "spillover_tokens_total",
                 "spillover_cost_usd_total", "spillover_saving_usd_total"):
        assert series(s, name) == [], name


# -- latency -------------------------------------------------------------------------


def test_latency_and_ttft_histograms() -> None:
    m = Metrics(["demo"])
    m.observe(call(elapsed=0.3, ttft=0.04))
    m.observe(call(route="hosted", elapsed=0.0, ttft=None))
    s = samples(m)
    lat, ttft = "spillover_request_latency_seconds", "spillover_time_to_first_token_seconds"
    assert value(s, f"{lat}_count", route="local", priority="interactive") == 1
    assert 0.3 <= (value(s, f"{lat}_sum", route="local", priority="interactive") or 0) < 5
    assert value(s, f"{lat}_bucket", route="local", priority="interactive", le="0.25") == 0
    assert value(s, f"{lat}_bucket", route="local", priority="interactive", le="5.0") == 1
    assert value(s, f"{lat}_bucket", route="local", priority="interactive", le="+Inf") == 1
    assert value(s, f"{lat}_count", route="hosted", priority="interactive") == 1
    assert value(s, f"{ttft}_count", route="local", priority="interactive") == 1
    assert value(s, f"{ttft}_sum", route="local", priority="interactive") == pytest.approx(0.04)
    assert value(s, f"{ttft}_bucket", route="local", priority="interactive", le="0.025") == 0
    assert value(s, f"{ttft}_bucket", route="local", priority="interactive", le="0.05") == 1
    # No first token, no sample.
    assert value(s, f"{ttft}_count", route="hosted", priority="interactive") is None


# -- tokens and money ----------------------------------------------------------------


def test_tokens_by_kind() -> None:
    m = Metrics(["demo"])
    m.observe(call(prompt=10, completion=5))
    m.observe(call(prompt=7))
    m.observe(call(route="hosted", completion=2))
    s = samples(m)
    tok = "spillover_tokens_total"
    assert value(s, tok, alias="demo", route="local", kind="prompt") == 17
    assert value(s, tok, alias="demo", route="local", kind="completion") == 5
    assert value(s, tok, alias="demo", route="hosted", kind="completion") == 2
    assert value(s, tok, alias="demo", route="hosted", kind="prompt") is None


def test_cost_by_caller_and_route() -> None:
    m = Metrics(["demo"])
    m.observe(call(cost=0.01))
    m.observe(call(cost=0.02))
    m.observe(call(caller="batch", route="hosted", cost=0.5))
    m.observe(call(caller="free", cost=0.0))
    m.observe(call(caller="unpriced", cost=None))
    s = samples(m)
    cost = "spillover_cost_usd_total"
    assert value(s, cost, caller="app", route="local") == pytest.approx(0.03)
    assert value(s, cost, caller="batch", route="hosted") == pytest.approx(0.5)
    assert len(series(s, cost)) == 2


@pytest.mark.parametrize(
    ("cost", "equiv", "saving"),
    [
        (0.01, 0.05, 0.04),
        (None, 0.03, 0.03),  # a free local call saves the whole hosted price
        (0.0, 0.03, 0.03),
        (0.05, 0.05, None),  # no saving
        (0.08, 0.05, None),  # dearer than hosted: no negative saving (counters only grow)
        (0.01, None, None),  # no hosted equivalent known
        (None, None, None),
    ],
)
def test_saving_only_when_positive(
    cost: float | None, equiv: float | None, saving: float | None
) -> None:
    m = Metrics(["demo"])
    m.observe(call(cost=cost, equiv=equiv))
    got = value(samples(m), "spillover_saving_usd_total", caller="app", route="local")
    assert got == (None if saving is None else pytest.approx(saving))


# -- live gauges ---------------------------------------------------------------------

ENGINES: dict[str, dict[str, object]] = {
    "e1": {"alias": "demo", "waiting": 2, "running": 1, "kv_cache": 0.5, "inflight": 3,
           "saturated": True, "healthy": True, "tokens_per_s": 10.0},
    "e2": {"alias": "code", "waiting": None, "kv_cache": "n/a", "inflight": 0,
           "saturated": False, "healthy": False},
}
BREAKERS = {"up": {"state": "open"}, "mid": {"state": "half-open"},
            "ok": {"state": "closed"}, "odd": {"state": "weird"}}
BUDGETS: dict[str, object] = {
    "global": {"daily": {"limit": 1.0, "spent": 0.2, "reserved": 0, "left": 0.8},
               "monthly": {"limit": None, "spent": 0.2, "reserved": 0, "left": None}},
    "callers": {"app": {"daily": {"limit": 0.5, "spent": 0.1, "reserved": 0.05,
                                  "left": 0.35}}},
}


def watched(engines: Mapping[str, Mapping[str, object]] = ENGINES,
            breakers: Mapping[str, Mapping[str, object]] = BREAKERS,
            budgets: Mapping[str, object] = BUDGETS,
            today: Mapping[str, float] | None = None) -> Metrics:
    m = Metrics(["demo"])
    m.watch(lambda: engines, lambda: breakers, lambda: budgets,
            lambda: {"local_share": 0.75} if today is None else today)
    return m


@pytest.mark.parametrize(
    ("engine", "alias", "key", "expected"),
    [
        ("e1", "demo", "waiting", 2.0),
        ("e1", "demo", "running", 1.0),
        ("e1", "demo", "kv_cache", 0.5),
        ("e1", "demo", "inflight", 3.0),
        ("e1", "demo", "saturated", 1.0),
        ("e1", "demo", "healthy", 1.0),
        ("e1", "demo", "tokens_per_s", 10.0),
        ("e2", "code", "waiting", None),  # None: no sample rather than a made-up zero
        ("e2", "code", "running", None),  # missing
        ("e2", "code", "kv_cache", None),  # not a number
        ("e2", "code", "inflight", 0.0),
        ("e2", "code", "saturated", 0.0),
        ("e2", "code", "healthy", 0.0),
        ("e2", "code", "tokens_per_s", None),
    ],
)
def test_engine_gauges(engine: str, alias: str, key: str, expected: float | None) -> None:
    s = samples(watched())
    assert value(s, f"spillover_engine_{key}", engine=engine, alias=alias) == expected


def test_engine_without_alias_gets_an_empty_label() -> None:
    s = samples(watched(engines={"e3": {"inflight": 1}}))
    assert value(s, "spillover_engine_inflight", engine="e3", alias="") == 1.0


@pytest.mark.parametrize(("upstream", "state"), [("up", 2), ("mid", 1), ("ok", 0), ("odd", 0)])
def test_breaker_state(upstream: str, state: int) -> None:
    assert value(samples(watched()), "spillover_breaker_state", upstream=upstream) == state


def test_budget_gauges_only_where_known() -> None:
    s = samples(watched())
    left, spent = "spillover_budget_left_usd", "spillover_budget_spent_usd"
    assert value(s, left, scope="global", window="daily") == pytest.approx(0.8)
    assert value(s, left, scope="global", window="monthly") is None  # unlimited
    assert value(s, spent, scope="global", window="daily") == pytest.approx(0.2)
    assert value(s, spent, scope="global", window="monthly") == pytest.approx(0.2)
    assert value(s, left, scope="caller:app", window="daily") == pytest.approx(0.35)
    assert value(s, spent, scope="caller:app", window="daily") == pytest.approx(0.1)
    assert len(series(s, left)) == 2
    assert len(series(s, spent)) == 3


@pytest.mark.parametrize(
    "budgets",
    [{}, {"global": None, "callers": None}, {"global": {"daily": None}, "callers": []},
     {"global": "x", "callers": {"app": "y"}}],
)
def test_budget_snapshot_odd_shapes_render_no_series(budgets: dict[str, object]) -> None:
    s = samples(watched(budgets=budgets))
    assert series(s, "spillover_budget_left_usd") == []
    assert series(s, "spillover_budget_spent_usd") == []


@pytest.mark.parametrize(("today", "share"), [(None, 0.75), ({}, 0.0), ({"local_share": 1}, 1.0)])
def test_local_share(today: dict[str, float] | None, share: float) -> None:
    assert value(samples(watched(today=today)), "spillover_local_share") == share


def test_gauges_are_read_at_scrape_time() -> None:
    engines: dict[str, dict[str, object]] = {"e1": {"alias": "demo", "inflight": 1}}
    breakers: dict[str, dict[str, object]] = {"up": {"state": "closed"}}
    today = {"local_share": 0.1}
    calls = []

    def engines_now() -> dict[str, dict[str, object]]:
        calls.append(1)
        return engines

    m = Metrics(["demo"])
    m.watch(engines_now, lambda: breakers, dict, lambda: today)
    before = len(calls)  # registering may collect once, to learn the metric names
    assert value(samples(m), "spillover_engine_inflight", engine="e1", alias="demo") == 1
    engines["e1"]["inflight"] = 7
    engines["e2"] = {"alias": "demo", "inflight": 2}
    breakers["up"]["state"] = "open"
    today["local_share"] = 0.9
    s = samples(m)
    assert value(s, "spillover_engine_inflight", engine="e1", alias="demo") == 7
    assert value(s, "spillover_engine_inflight", engine="e2", alias="demo") == 2
    assert value(s, "spillover_breaker_state", upstream="up") == 2
    assert value(s, "spillover_local_share") == 0.9
    assert len(calls) == before + 2  # one read per scrape


def test_unwatched_metrics_have_no_live_gauges() -> None:
    s = samples(Metrics(["demo"]))
    assert not [n for n, _ in s if n.startswith(("spillover_engine_", "spillover_breaker",
                                                  "spillover_budget", "spillover_local"))]


# -- isolation -----------------------------------------------------------------------


def test_instances_do_not_share_state() -> None:
    a, b = Metrics(["demo"]), Metrics(["demo"])  # a global registry would raise here
    a.observe(call(prompt=5))
    b.watch(lambda: ENGINES, lambda: {}, dict, dict)
    sa, sb = samples(a), samples(b)
    assert value(sa, REQ, **req_labels()) == 1
    assert series(sb, REQ) == []
    assert series(sb, "spillover_tokens_total") == []
    assert series(sa, "spillover_engine_inflight") == []
    assert len(series(sb, "spillover_engine_inflight")) == 2
    default = {s.name for family in REGISTRY.collect() for s in family.samples}
    assert not [n for n in default if n.startswith("spillover_")]


def test_requests_tokens_and_cost_by_inbound_api() -> None:
    from router.accounting.recorder import Recorder

    m = Metrics(["demo"])
    rec = Recorder()
    calls = []
    for api, status, batch in (("messages", 200, ""), ("messages", 529, ""),
                               ("responses", 200, ""), (None, 200, ""), (None, 200, "b1")):
        c = call(prompt=10, completion=4, cost=0.5, status=status)
        c.api, c.batch_id = api, batch
        calls.append(c)
        m.observe(c)
        rec.finish_nowait(c)  # tallied for the dashboard (no ledger here)
    s = samples(m)
    assert value(s, "spillover_api_requests_total", api="messages", route="local",
                 status="529") == 1
    # A line of a batch counts as the Batch API's, not as the chat completion it ran as.
    assert value(s, "spillover_api_requests_total", api="batches", route="local",
                 status="200") == 1
    assert value(s, "spillover_api_requests_total", api="chat", route="local",
                 status="200") == 1
    assert value(s, "spillover_api_tokens_total", api="messages", kind="prompt") == 20
    assert value(s, "spillover_api_tokens_total", api="responses", kind="completion") == 4
    assert value(s, "spillover_api_cost_usd_total", api="batches") == 0.5
    # The dashboard's feed (/status "apis"): the same split, today.
    apis = rec.apis()
    assert list(apis) == ["batches", "chat", "messages", "responses"]
    assert apis["messages"] == {"requests": 2, "errors": 1, "prompt_tokens": 20,
                                "completion_tokens": 8, "cost_usd": 1.0}
    assert apis["batches"]["requests"] == 1 and apis["chat"]["errors"] == 0
