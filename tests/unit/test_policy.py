"""The routing decision as a table: facts x backends x load -> plan (pure, no network)."""

from __future__ import annotations

import pytest

from router.routing.catalog import Catalog
from router.routing.policy import EngineLoad, RequestFacts, decide
from tests.unit.helpers import config

TWO_LOCALS = """
providers:
  mistral: {kind: mistral, base_url: "https://m.test/v1", api_key_env: K}
  other: {base_url: "https://o.test/v1", api_key_env: K2}
aliases:
  m:
    local:
      - {name: gpu0, model: w, license: apache-2.0, port: 9001, max_model_len: 1000}
      - {name: gpu1, model: w, license: apache-2.0, port: 9002, max_model_len: 1000}
    hosted:
      - {provider: other, model: big, price: {input_per_mtok: 5, output_per_mtok: 5}}
      - {provider: mistral, model: small, price: {input_per_mtok: 0.1, output_per_mtok: 0.3}}
  research:
    local:
      - {name: large0, model: w, license: mrl, port: 9003}
    hosted:
      - {provider: mistral, model: large, price: {input_per_mtok: 2, output_per_mtok: 6}}
  research-only:
    local:
      - {name: large1, model: w, license: mrl, port: 9004}
  embed:
    hosted:
      - {provider: mistral, model: mistral-embed, endpoints: [embeddings],
         price: {input_per_mtok: 0.1, output_per_mtok: 0}}
"""
CAT = Catalog(config(TWO_LOCALS))

OK = EngineLoad(healthy=True, saturated=False, score=0.1)
BUSY = EngineLoad(healthy=True, saturated=False, score=0.6)
FULL = EngineLoad(healthy=True, saturated=True, score=1.2, waiting=3)
DOWN = EngineLoad(healthy=False, saturated=False, score=0.0)


def f(alias: str = "m", **kw: object) -> RequestFacts:
    return RequestFacts(alias=alias, endpoint=kw.pop("endpoint", "chat"), **kw)  # type: ignore[arg-type]


CASES = [
    # name, facts, load, expected target order, reason, refusal status
    ("idle local wins", f(), {"gpu0": OK, "gpu1": OK}, ["gpu0", "gpu1", "mistral:small",
                                                        "other:big"], "local-ok", None),
    ("least loaded replica first", f(), {"gpu0": BUSY, "gpu1": OK},
     ["gpu1", "gpu0", "mistral:small", "other:big"], "local-ok", None),
    ("one replica down", f(), {"gpu0": DOWN, "gpu1": OK},
     ["gpu1", "mistral:small", "other:big"], "local-ok", None),
    ("all saturated spill, cheapest hosted first", f(), {"gpu0": FULL, "gpu1": FULL},
     ["mistral:small", "other:big", "gpu0", "gpu1"], "local-saturated", None),
    ("all down", f(), {"gpu0": DOWN, "gpu1": DOWN}, ["mistral:small", "other:big"],
     "local-down", None),
    ("no load known is down", f(), {}, ["mistral:small", "other:big"], "local-down", None),
    ("forced hosted", f(force="hosted"), {"gpu0": OK, "gpu1": OK},
     ["mistral:small", "other:big"], "forced", None),
    ("forced local", f(force="local"), {"gpu0": OK, "gpu1": OK}, ["gpu0", "gpu1"],
     "forced", None),
    ("forced local, all down", f(force="local"), {"gpu0": DOWN, "gpu1": DOWN}, [],
     "none", 503),
    ("residency keeps it local", f(onprem_only=True), {"gpu0": OK, "gpu1": FULL},
     ["gpu0", "gpu1"], "local-ok", None),
    ("residency under saturation waits, never hosted", f(onprem_only=True),
     {"gpu0": FULL, "gpu1": FULL}, [], "none", 503),
    ("residency with every engine down", f(onprem_only=True), {"gpu0": DOWN, "gpu1": DOWN},
     [], "none", 503),
    ("context too long for local", f(prompt_tokens=900, max_tokens=200),
     {"gpu0": OK, "gpu1": OK}, ["mistral:small", "other:big"], "context-length", None),
    ("research licence refuses commercial use", f("research"), {"large0": OK},
     ["mistral:large"], "license", None),
    ("research licence serves research use", f("research", commercial_use=False),
     {"large0": OK}, ["large0", "mistral:large"], "local-ok", None),
    ("nothing allowed for commercial use", f("research-only"), {"large1": OK}, [],
     "none", 403),
    ("embeddings only hosted", f("embed", endpoint="embeddings"), {},
     ["mistral:mistral-embed"], "hosted-only", None),
    ("capability missing", f("embed"), {}, [], "none", 400),
    ("fim nowhere", f(endpoint="fim"), {"gpu0": OK, "gpu1": OK}, [], "none", 400),
    # worst case for "small": 1 x 0.1 + 4096 x 0.3 per M = $0.00123; "big": $0.0205
    ("max_request_usd keeps the expensive one out", f(max_request_usd=0.01),
     {"gpu0": FULL, "gpu1": DOWN}, ["mistral:small", "gpu0"], "local-saturated", None),
    ("max_request_usd below every offering", f(max_request_usd=0.0001),
     {"gpu0": DOWN, "gpu1": DOWN}, [], "none", 503),
    ("budget allows only the cheap one", f(hosted_allowance_usd=0.002),
     {"gpu0": DOWN, "gpu1": DOWN}, ["mistral:small"], "local-down", None),
    ("budget spent, local still serves", f(hosted_allowance_usd=0.0),
     {"gpu0": OK, "gpu1": DOWN}, ["gpu0"], "local-ok", None),
    ("budget spent and local full", f(hosted_allowance_usd=0.0),
     {"gpu0": FULL, "gpu1": FULL}, [], "none", 429),
    ("small max_tokens fits the budget", f(hosted_allowance_usd=0.0001, max_tokens=100),
     {"gpu0": DOWN, "gpu1": DOWN}, ["mistral:small"], "local-down", None),
    ("cost-first still plans the spill", f(mode="cost-first"), {"gpu0": FULL, "gpu1": FULL},
     ["mistral:small", "other:big", "gpu0", "gpu1"], "local-saturated", None),
]


@pytest.mark.parametrize(("facts", "load", "order", "reason", "refusal"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(facts: RequestFacts, load: dict[str, EngineLoad], order: list[str],
                reason: str, refusal: int | None) -> None:
    backends = CAT.backends(facts.alias)
    assert backends is not None
    plan = decide(facts, backends, load)
    assert [b.name for b in plan.targets] == order
    assert plan.reason == reason
    assert (plan.refusal.status if plan.refusal else None) == refusal


def test_open_breaker_moves_to_the_next_provider() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    plan = decide(f(), backends, {"gpu0": DOWN, "gpu1": DOWN},
                  unavailable={"mistral:small": "circuit open"})
    assert [b.name for b in plan.targets] == ["other:big"]
    assert ("mistral:small", "unavailable") in {(s.backend, s.reason) for s in plan.skipped}


def test_waiting_is_offered_only_when_it_could_help() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    full = {"gpu0": FULL, "gpu1": FULL}
    assert decide(f(mode="cost-first"), backends, full).wait_for_local
    assert not decide(f(), backends, full).wait_for_local  # latency-first spills at once
    assert decide(f(onprem_only=True), backends, full).wait_for_local
    down = {"gpu0": DOWN, "gpu1": DOWN}
    assert not decide(f(onprem_only=True), backends, down).wait_for_local


def test_every_skip_is_explained() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    plan = decide(f(onprem_only=True), backends, {"gpu0": DOWN, "gpu1": FULL})
    skips = {(s.backend, s.reason) for s in plan.skipped}
    assert skips == {("gpu0", "local-down"), ("gpu1", "local-saturated"),
                     ("other:big", "residency"), ("mistral:small", "residency")}


# --- refusals: retryable (503/429 with Retry-After) only where waiting can help ------------

STARTING = EngineLoad(healthy=False, saturated=False, score=0.0, starting=True,
                      starting_for_s=30.0, ready_in_s=89.2)
STARTING_FIRST = EngineLoad(healthy=False, saturated=False, score=0.0, starting=True,
                            starting_for_s=30.0)
KEYLESS = {"mistral:small": "K", "other:big": "K2", "mistral:large": "K",
           "mistral:mistral-embed": "K"}

REFUSALS = [
    # name, facts, load, keyless, status, code, retry_after (None: not retryable)
    ("on-prem prompt over every local context", f(onprem_only=True, prompt_tokens=5000),
     {"gpu0": OK, "gpu1": FULL}, {}, 400, "context_length_exceeded", None),
    ("on-prem prompt too long, engines down too", f(onprem_only=True, prompt_tokens=5000),
     {"gpu0": DOWN, "gpu1": DOWN}, {}, 400, "context_length_exceeded", None),
    ("too long locally, hosted without key", f(prompt_tokens=5000), {"gpu0": OK, "gpu1": OK},
     KEYLESS, 400, "context_length_exceeded", None),
    ("on-prem, saturated: waiting helps", f(onprem_only=True), {"gpu0": FULL, "gpu1": FULL},
     {}, 503, "residency", 5),
    ("on-prem, one engine down one too small", f(onprem_only=True, max_tokens=500,
                                                 prompt_tokens=600),
     {"gpu0": DOWN, "gpu1": DOWN}, {}, 400, "context_length_exceeded", None),
    ("on-prem alias with no local engine", f("embed", endpoint="embeddings",
                                             onprem_only=True), {}, {}, 403, "residency",
     None),
    ("starting engine, no key: retry when it should be ready", f(),
     {"gpu0": STARTING, "gpu1": STARTING}, KEYLESS, 503, "local_starting", 90),
    ("starting engine first time, no key", f(), {"gpu0": STARTING_FIRST,
                                                 "gpu1": STARTING_FIRST},
     KEYLESS, 503, "local_starting", 10),
    ("starting engine, on-prem", f(onprem_only=True), {"gpu0": STARTING, "gpu1": DOWN},
     {}, 503, "local_starting", 90),
    ("hosted-only alias without its key", f("embed", endpoint="embeddings"), {}, KEYLESS,
     503, "no_backend", None),
    ("down engine, no key: may come back", f(), {"gpu0": DOWN, "gpu1": DOWN}, KEYLESS, 503,
     "no_backend", 5),
    ("licence and no key", f("research"), {"large0": OK}, KEYLESS, 403, "license", None),
    ("cost cap with engines up but too small", f(max_request_usd=0.0001, prompt_tokens=1500),
     {"gpu0": OK, "gpu1": OK}, {}, 400, "cost_limit", None),
    ("cost cap with engines down", f(max_request_usd=0.0001), {"gpu0": DOWN, "gpu1": DOWN},
     {}, 503, "cost_limit", 5),
    ("forced local onto a too-small engine", f(force="local", prompt_tokens=5000),
     {"gpu0": OK, "gpu1": OK}, {}, 400, "context_length_exceeded", None),
    ("budget spent and local full", f(hosted_allowance_usd=0.0),
     {"gpu0": FULL, "gpu1": FULL}, {}, 429, "budget_exceeded", None),
]


@pytest.mark.parametrize(("facts", "load", "keyless", "status", "code", "retry_after"),
                         [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refusals(facts: RequestFacts, load: dict[str, EngineLoad], keyless: dict[str, str],
                  status: int, code: str, retry_after: int | None) -> None:
    backends = CAT.backends(facts.alias)
    assert backends is not None
    plan = decide(facts, backends, load, keyless=keyless)
    assert plan.targets == ()
    r = plan.refusal
    assert r is not None
    assert (r.status, r.code, r.retry_after_s) == (status, code, retry_after), r.message
    if retry_after is not None:
        assert f"retry in {retry_after} s" in r.message  # the header's number, said once
    if status in (429,) or (status == 503 and retry_after is None):
        assert code in ("budget_exceeded", "no_backend")


def test_context_refusal_names_the_limit() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    plan = decide(f(onprem_only=True, prompt_tokens=5000), backends, {"gpu0": OK, "gpu1": OK})
    assert plan.refusal is not None and "1000 tokens" in plan.refusal.message


def test_starting_refusal_says_what_is_starting_and_that_no_fallback_exists() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    plan = decide(f(), backends, {"gpu0": STARTING, "gpu1": STARTING}, keyless=KEYLESS)
    assert plan.refusal is not None
    msg = plan.refusal.message
    assert "'gpu0'" in msg and "starting" in msg and "about 90 s" in msg
    assert "no hosted fallback is configured" in msg and "$K is not set" in msg


def test_keyless_offerings_are_no_candidates() -> None:
    backends = CAT.backends("m")
    assert backends is not None
    plan = decide(f(), backends, {"gpu0": DOWN, "gpu1": DOWN}, keyless={"other:big": "K2"})
    assert [b.name for b in plan.targets] == ["mistral:small"]
    assert ("other:big", "no-api-key", "$K2 is not set") in {
        (s.backend, s.reason, s.detail) for s in plan.skipped}


def test_open_breaker_refusal_retry_after_is_the_true_wait() -> None:
    backends = CAT.backends("embed")
    assert backends is not None
    plan = decide(f("embed", endpoint="embeddings"), backends, {},
                  unavailable={"mistral:mistral-embed": "circuit open, retry in 14 s"},
                  retry_in={"mistral:mistral-embed": 13.9})
    assert plan.refusal is not None
    assert (plan.refusal.status, plan.refusal.retry_after_s) == (503, 14)
    assert "retry in 14 s" in plan.refusal.message


# --- traffic classes ----------------------------------------------------------------------

CLASSES = """
providers:
  mistral: {kind: mistral, base_url: "https://m.test/v1", api_key_env: K}
aliases:
  m:
    local:
      - {name: gpu0, model: w, license: apache-2.0, port: 9001,
         saturation: {max_inflight: 10, batch_below: 0.5}}
    hosted:
      - {provider: mistral, model: small, price: {input_per_mtok: 1, output_per_mtok: 3}}
  priced:
    local:
      - {name: gpu1, model: w, license: apache-2.0, port: 9002,
         saturation: {max_inflight: 10, batch_below: 0.3}}
    hosted:
      - {provider: mistral, model: small, price: {input_per_mtok: 1, output_per_mtok: 3},
         batch_price: {input_per_mtok: 0.5, output_per_mtok: 1.5}}
  hosted-only:
    hosted:
      - {provider: mistral, model: large, price: {input_per_mtok: 2, output_per_mtok: 6}}
  onprem:
    local:
      - {name: gpu2, model: w, license: apache-2.0, port: 9003}
"""
CLS = Catalog(config(CLASSES))


def load(score: float, saturated: bool = False) -> EngineLoad:
    return EngineLoad(healthy=True, saturated=saturated, score=score)


BATCH, STD, INTER = "batch", "standard", "interactive"
# 12 in flight of max_inflight 10, 9 of them batch: full for batch, 0.3 for the others.
BATCH_FULL = EngineLoad(healthy=True, saturated=True, score=1.2, inflight=12,
                        urgent_saturated=False, urgent_score=0.3, batch_inflight=9)
PRIORITY_CASES = [
    # name, facts, load, expected target order, reason, refusal (status, code, retry-after)
    ("batch on an idle engine runs locally, no hosted fallback at the interactive price",
     f(priority=BATCH), {"gpu0": load(0.1)}, ["gpu0"], "local-ok", None),
    ("batch just under its line runs locally", f(priority=BATCH), {"gpu0": load(0.49)},
     ["gpu0"], "local-ok", None),
    ("batch at its line is refused with a retry, not spilled",
     f(priority=BATCH), {"gpu0": load(0.5)}, [], "none", (503, "batch_deferred", 5)),
    ("batch on a saturated engine is refused with a retry, not spilled",
     f(priority=BATCH), {"gpu0": load(1.2, saturated=True)}, [], "none",
     (503, "batch_deferred", 5)),
    ("interactive at the batch line still runs locally (headroom kept for it)",
     f(priority=INTER), {"gpu0": load(0.6)}, ["gpu0", "mistral:small"], "local-ok", None),
    ("interactive just under saturation still runs locally", f(priority=INTER),
     {"gpu0": load(0.95)}, ["gpu0", "mistral:small"], "local-ok", None),
    ("standard at the batch line runs locally", f(priority=STD, mode="cost-first"),
     {"gpu0": load(0.6)}, ["gpu0", "mistral:small"], "local-ok", None),
    ("interactive on a saturated engine spills as today", f(priority=INTER),
     {"gpu0": load(1.2, saturated=True)}, ["mistral:small", "gpu0"], "local-saturated", None),
    ("batch with the engine down is refused with a retry", f(priority=BATCH),
     {"gpu0": DOWN}, [], "none", (503, "no_backend", 5)),
    ("batch over its line goes hosted at a batch price when one exists",
     f("priced", priority=BATCH), {"gpu1": load(0.4)}, ["mistral:small", "gpu1"],
     "local-saturated", None),
    ("batch under its line stays local even with a batch price", f("priced", priority=BATCH),
     {"gpu1": load(0.2)}, ["gpu1", "mistral:small"], "local-ok", None),
    ("batch for a hosted-only alias without a batch price: a clear 400",
     f("hosted-only", priority=BATCH), {}, [], "none", (400, "priority_unavailable", None)),
    ("batch on-prem only waits like any on-prem request", f("onprem", priority=BATCH),
     {"gpu2": load(0.9)}, [], "none", (503, "batch_deferred", 5)),
    # A priority-scheduled engine full only because of batch work: the engine serves the
    # urgent classes first, so their admission leaves the batch's requests out.
    ("interactive on an engine full of batch work runs locally (priority engine)",
     f(priority=INTER), {"gpu0": BATCH_FULL}, ["gpu0", "mistral:small"], "local-ok", None),
    ("standard on an engine full of batch work runs locally (priority engine)",
     f(priority=STD, mode="cost-first"), {"gpu0": BATCH_FULL}, ["gpu0", "mistral:small"],
     "local-ok", None),
    ("batch counts every request, its own included: deferred",
     f(priority=BATCH), {"gpu0": BATCH_FULL}, [], "none", (503, "batch_deferred", 5)),
    ("interactive on an engine full of urgent work spills (priority engine)",
     f(priority=INTER), {"gpu0": EngineLoad(healthy=True, saturated=True, score=1.2,
                                             urgent_saturated=True, urgent_score=1.0)},
     ["mistral:small", "gpu0"], "local-saturated", None),
]


@pytest.mark.parametrize(("facts", "load", "order", "reason", "refusal"),
                         [c[1:] for c in PRIORITY_CASES], ids=[c[0] for c in PRIORITY_CASES])
def test_decide_by_class(facts: RequestFacts, load: dict[str, EngineLoad], order: list[str],
                         reason: str, refusal: tuple[int, str, int | None] | None) -> None:
    backends = CLS.backends(facts.alias)
    assert backends is not None
    plan = decide(facts, backends, load)
    assert [b.name for b in plan.targets] == order
    assert plan.reason == reason
    r = plan.refusal
    assert (None if r is None else (r.status, r.code, r.retry_after_s)) == refusal, \
        r and r.message


def test_batch_waits_for_local_headroom_and_says_why() -> None:
    backends = CLS.backends("m")
    assert backends is not None
    plan = decide(f(priority=BATCH), backends, {"gpu0": load(0.7)})
    assert plan.wait_for_local  # the gateway waits for headroom before the 503
    assert plan.refusal is not None
    assert "batch line 0.5" in plan.refusal.message
    assert "batch price" in plan.refusal.message
    skips = {(s.backend, s.reason) for s in plan.skipped}
    assert skips == {("gpu0", "local-saturated"), ("mistral:small", "priority")}


def test_batch_worst_case_is_at_the_batch_price() -> None:
    backends = CLS.backends("priced")
    assert backends is not None
    hosted = backends[-1]
    facts = f("priced", priority=BATCH, max_tokens=1000, prompt_tokens=1000)
    assert facts.worst_case_usd(hosted) == pytest.approx((1000 * 0.5 + 1000 * 1.5) / 1e6)
    inter = f("priced", max_tokens=1000, prompt_tokens=1000)
    assert inter.worst_case_usd(hosted) == pytest.approx((1000 * 1 + 1000 * 3) / 1e6)
    # A batch allowance that covers the batch price but not the full one still goes hosted.
    plan = decide(f("priced", priority=BATCH, max_tokens=1000, prompt_tokens=1000,
                    hosted_allowance_usd=0.0025), backends, {"gpu1": load(0.9)})
    assert [b.name for b in plan.targets] == ["mistral:small", "gpu1"]
