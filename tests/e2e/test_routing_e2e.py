"""The routing brain end to end: licences, residency under saturation, a budget race,
breakers and deadlines, with the real vLLM CPU engine and the fake La Plateformes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from router.routing.auth import key_digest
from tests.e2e.conftest import Hosted, Router
from tests.e2e.test_gateway_e2e import HELLO, _long_streams

pytestmark = pytest.mark.e2e

KEYS = {"app": "sk-e2e-app", "lab": "sk-e2e-lab", "vault": "sk-e2e-vault",
        "spender": "sk-e2e-spender", "admin": "sk-e2e-admin"}


def callers(**overrides: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, dict[str, Any]] = {
        "app": {"use": "commercial"},
        "lab": {"use": "research"},
        "vault": {"residency": "onprem"},
        "spender": {},
    }
    for name, policy in overrides.items():
        base[name] = {**base[name], **policy}
    for name, policy in base.items():
        policy["key_sha256"] = [key_digest(KEYS[name])]
    return base


def with_key(router: Router, who: str) -> openai.OpenAI:
    return router.client.with_options(api_key=KEYS[who])


def status(router: Router) -> dict[str, Any]:
    r = httpx.get(router.url + "/status", timeout=10,
                  headers={"authorization": f"Bearer {KEYS['admin']}"})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def licensed_aliases(engine_url: str) -> dict[str, Any]:
    """The demo engine posing as research-licensed weights (MRL), with and without a
    hosted offering."""
    local = {"model": "demo", "license": "mrl", "served_model_name": "demo",
             "base_url": engine_url, "max_model_len": 2048}
    return {
        "large": {"local": [{"name": "large-local", **local}],
                  "hosted": [{"provider": "mistral", "model": "mistral-large-latest",
                              "price": {"input_per_mtok": 2.0, "output_per_mtok": 6.0}}]},
        "research-only": {"local": [{"name": "research-local", **local}]},
    }


def test_license_sends_commercial_callers_hosted(make_router: Any, engine: Any,
                                                 plateforme: Hosted) -> None:
    router: Router = make_router(extra={
        "callers": callers(), "admin_key_sha256": [key_digest(KEYS["admin"])],
        "aliases": licensed_aliases(engine.base_url)})
    raw = with_key(router, "app").chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "hosted"
    assert raw.headers["x-spillover-reason"] == "license"
    assert plateforme.fake.requests_to("/v1/chat/completions")[0].body["model"] == \
        "mistral-large-latest"
    raw = with_key(router, "lab").chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local"
    assert raw.headers["x-spillover-backend"] == "large-local"
    with pytest.raises(openai.PermissionDeniedError) as info:
        with_key(router, "app").chat.completions.create(
            model="research-only", messages=HELLO, max_tokens=8)
    assert "Mistral Research License" in info.value.message
    assert info.value.code == "license"
    assert len(plateforme.fake.requests) == 1


def test_onprem_never_reaches_plateforme_even_saturated(make_router: Any,
                                                        plateforme: Hosted) -> None:
    router: Router = make_router(max_inflight=2, extra={
        "callers": callers(), "admin_key_sha256": [key_digest(KEYS["admin"])],
        "routing": {"residency_max_wait_s": 1.0}})
    app, vault = with_key(router, "app"), with_key(router, "vault")
    stop, started = threading.Event(), threading.Semaphore(0)
    routes: list[str] = []
    router.client = app  # the long streams come from a commercial caller
    # ~8 MB each: more than every buffer between engine and reader, so the engine stays
    # saturated through the three requests below however fast it generates.
    threads = _long_streams(router, 2, routes, stop, started, seqs=24)
    try:
        for _ in range(2):
            assert started.acquire(timeout=60)
        assert routes == ["local", "local"]
        engine = status(router)["engines"]["demo-local"]
        assert engine["saturated"], engine
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:  # 503
            vault.chat.completions.create(model="demo", messages=HELLO, max_tokens=8)
        waited = time.monotonic() - t0
        assert info.value.status_code == 503 and info.value.code == "residency"
        assert info.value.response.headers["retry-after"]
        assert 0.9 <= waited < 10
        with pytest.raises(openai.InternalServerError):
            app.chat.completions.create(model="demo", messages=HELLO, max_tokens=8,
                                        extra_headers={"x-spillover-residency": "onprem"})
        # The fake's own log: nothing on-prem reached it.
        assert plateforme.fake.requests == []
        raw = app.chat.completions.with_raw_response.create(
            model="demo", messages=HELLO, max_tokens=8)
        assert raw.headers["x-spillover-reason"] == "local-saturated"
        assert len(plateforme.fake.requests) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    router.wait_for(lambda s: not s["engines"]["demo-local"]["saturated"], 60, "drain")
    raw = vault.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local"
    assert len(plateforme.fake.requests) == 1


def test_budget_race_never_overspends(make_router: Any, plateforme: Hosted,
                                      backup: Hosted) -> None:
    # Worst case of one request on La Plateforme: prompt estimate (2 tokens) at $0.1/M
    # plus 8 output tokens at $0.3/M = $2.6e-6; the budget covers three of them.
    worst = (2 * 0.1 + 8 * 0.3) / 1e6
    budget = 3 * worst
    router: Router = make_router(extra={
        "callers": callers(spender={"budget": {"daily_usd": budget}}),
        "admin_key_sha256": [key_digest(KEYS["admin"])]})
    plateforme.fake.latency_s = 0.5
    backup.fake.latency_s = 0.5
    spender = with_key(router, "spender")

    def one(_: int) -> tuple[int, str | None, str]:
        try:
            raw = spender.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                extra_headers={"x-spillover-route": "hosted"})
            return 200, raw.headers.get("x-spillover-cost-usd"), ""
        except openai.APIStatusError as exc:
            return exc.status_code, None, str(exc.code)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert ok and refused, results
    assert {r[0] for r in refused} == {429} and {r[2] for r in refused} == {"budget_exceeded"}
    spent = sum(float(r[1] or 0) for r in ok)
    booked = status(router)["budgets"]["callers"]["spender"]["daily"]
    assert booked["spent"] == pytest.approx(spent, abs=1e-12)
    assert spent <= budget + worst
    # Every call that reached a provider was answered and booked: no hidden spend.
    upstream = len(plateforme.fake.requests) + len(backup.fake.requests)
    assert upstream == len(ok)


def test_429_opens_breaker_and_traffic_moves_on(make_router: Any, plateforme: Hosted,
                                                backup: Hosted) -> None:
    router: Router = make_router(extra={
        "callers": callers(), "admin_key_sha256": [key_digest(KEYS["admin"])]})
    app = with_key(router, "app")
    plateforme.fake.fail_next(1, 429, retry_after=30)
    hosted = {"x-spillover-route": "hosted"}
    raw = app.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8, extra_headers=hosted)
    assert raw.headers["x-spillover-backend"] == "backup"
    assert raw.headers["x-spillover-reason"] == "failover"
    breaker = status(router)["breakers"]["mistral:mistral-small-latest"]
    assert breaker["state"] == "open" and breaker["retry_in_s"] > 20
    for _ in range(3):
        raw = app.chat.completions.with_raw_response.create(
            model="demo", messages=HELLO, max_tokens=8, extra_headers=hosted)
        assert raw.headers["x-spillover-backend"] == "backup"
    assert len(plateforme.fake.requests) == 1  # the open breaker kept traffic away
    assert len(backup.fake.requests) == 4


def test_stalled_upstreams_end_within_the_deadline(make_router: Any, plateforme: Hosted,
                                                   backup: Hosted) -> None:
    router: Router = make_router(request_timeout_s=3)
    plateforme.fake.mode = "stall"
    backup.fake.mode = "stall"
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        router.client.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=8,
            extra_headers={"x-spillover-route": "hosted"})
    elapsed = time.monotonic() - t0
    assert info.value.status_code == 504
    # Bounded by the deadline (3 s), with room for a loaded machine; without the
    # deadline it would take the fakes' 30 s stall.
    assert elapsed < 3 + 5, elapsed
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        list(router.client.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=8, stream=True,
            extra_headers={"x-spillover-route": "hosted"}))
    assert info.value.status_code == 504
    assert time.monotonic() - t0 < 3 + 5
