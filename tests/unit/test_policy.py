"""The routing decision as a table: facts x backends x load -> plan (pure, no network)."""

from __future__ import annotations

import pytest

from router.catalog import Catalog
from router.policy import EngineLoad, RequestFacts, decide
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
