"""Callers, licences, residency, cost, budgets, waiting and breakers through the gateway
(upstreams faked with MockTransport)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import yaml

from tests.unit.helpers import (
    BACKUP,
    BASE_YAML,
    CHAT,
    World,
    assert_openai_error,
    auth,
    brain_config,
    chunk,
    completion,
    router,
    router_app,
)


def backup_world(world: World, backup: Callable[[httpx.Request], httpx.Response]) -> World:
    inner = world._handle

    def handle(req: httpx.Request) -> httpx.Response:
        if str(req.url).startswith(BACKUP):
            world.seen.append(("backup", req.url.path, json.loads(req.content)))
            return backup(req)
        return inner(req)

    world._handle = handle  # type: ignore[method-assign]
    return world


async def test_missing_and_unknown_keys_are_401(world: World) -> None:
    async with router(world, brain_config()) as c:
        err = assert_openai_error(await c.post("/v1/chat/completions", json=CHAT), 401)
        assert err["code"] == "missing_api_key"
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"authorization": "Bearer sk-nope-secret"})
        err = assert_openai_error(r, 401)
        assert "sk-nope" not in r.text
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"


async def test_alias_not_allowed_and_force_not_allowed(world: World) -> None:
    async with router(world, brain_config()) as c:
        # An alias the caller may not use answers exactly like one that does not exist.
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "research"},
                         headers=auth("bob"))
        nothing = await c.post("/v1/chat/completions", json={**CHAT, "model": "researcX"},
                               headers=auth("bob"))
        assert assert_openai_error(r, 404)["code"] == "model_not_found"
        assert r.json() == json.loads(nothing.text.replace("researcX", "research"))
        assert {k: v for k, v in r.headers.items() if k not in ("x-request-id",
                                                                "content-length")} == {
            k: v for k, v in nothing.headers.items() if k not in ("x-request-id",
                                                                 "content-length")}
        for path in ("/v1/route/explain", "/v1/chat/completions"):
            r = await c.post(path, json={**CHAT, "model": "research"}, headers=auth("bob"))
            assert assert_openai_error(r, 404)["code"] == "model_not_found"
        models = (await c.get("/v1/models", headers=auth("bob"))).json()
        assert [m["id"] for m in models["data"]] == ["demo"]
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={**auth("bob"), "x-spillover-route": "hosted"})
        assert assert_openai_error(r, 403)["code"] == "route_not_allowed"


async def test_license_skips_local_for_commercial_callers(world: World) -> None:
    async with router(world, brain_config()) as c:
        # research alias: MRL weights, no hosted offering: commercial -> 403 naming it.
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "research"},
                         headers=auth("alice"))
        err = assert_openai_error(r, 403)
        assert err["code"] == "license" and "Mistral Research License" in str(err["message"])
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "research"},
                         headers=auth("lab"))
        assert r.status_code == 200 and r.headers["x-spillover-backend"] == "large-local"


async def test_residency_never_leaves_even_when_saturated(world: World) -> None:
    world.waiting = 5
    async with router(world, brain_config()) as c:
        for headers in (auth("vault"), {**auth("alice"), "x-spillover-residency": "onprem"}):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
            err = assert_openai_error(r, 503)
            assert err["code"] == "residency" and r.headers["retry-after"]
        assert world.bodies("hosted") == []
        # Others spill as usual.
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.headers["x-spillover-reason"] == "local-saturated"


async def test_residency_waits_for_local_capacity(world: World) -> None:
    data = brain_config()
    data["routing"]["residency_max_wait_s"] = 5
    async with router_app(world, data) as (c, rt):
        world.waiting = 5
        await rt.monitor.refresh()

        async def drain() -> None:
            await asyncio.sleep(0.2)
            world.waiting = 0
            await rt.monitor.refresh()

        task = asyncio.create_task(drain())
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("vault"))
        await task
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
        assert world.bodies("hosted") == []


async def test_cost_first_waits_then_spills_and_reports_it(world: World) -> None:
    world.waiting = 5
    data = brain_config()
    data["callers"]["alice"]["mode"] = "cost-first"
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code == 200
        assert r.headers["x-spillover-reason"] == "cost-first-spill"
        assert r.headers["x-spillover-route"] == "hosted"
        # Latency-first callers spill at once with the plain reason.
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("lab"))
        assert r.headers["x-spillover-reason"] == "local-saturated"


async def test_max_request_usd_keeps_big_requests_local_or_refuses(world: World) -> None:
    world.local_up = False
    data = brain_config()
    data["callers"]["alice"]["max_request_usd"] = 0.001
    async with router(world, data) as c:
        small = {**CHAT, "max_tokens": 100}  # worst case ~ $0.00003 on mistral
        r = await c.post("/v1/chat/completions", json=small, headers=auth("alice"))
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "hosted"
        big = {**CHAT, "max_tokens": 100_000}  # $0.03 worst case
        r = await c.post("/v1/chat/completions", json=big, headers=auth("alice"))
        # Over the local context and over the per-request limit: no wait can serve it.
        assert assert_openai_error(r, 400)["code"] == "cost_limit"


async def test_budget_exhausted_is_429_and_spend_stays_under_budget(world: World) -> None:
    world.local_up = False
    data = brain_config()
    # Each call: worst case 10 prompt tokens estimate... reserved at max_tokens 1000 on
    # mistral = $0.0003; real usage (1000, 2000) costs $0.0007 -> settle higher.
    data["callers"]["alice"]["budget"] = {"daily_usd": 0.001}
    async with router(world, data) as c:
        body = {**CHAT, "max_tokens": 1000}
        results = await asyncio.gather(*(
            c.post("/v1/chat/completions", json=body, headers=auth("alice"))
            for _ in range(10)))
        ok = [r for r in results if r.status_code == 200]
        refused = [r for r in results if r.status_code == 429]
        assert ok and refused and len(ok) + len(refused) == 10
        for r in refused:
            assert r.json()["error"]["code"] == "budget_exceeded"
        status = (await c.get("/status", headers=auth("admin"))).json()
        alice = status["budgets"]["callers"]["alice"]["daily"]
        spent = sum(float(r.headers["x-spillover-cost-usd"]) for r in ok)
        assert alice["spent"] == pytest.approx(spent)
        # Reserved at the worst case before each call: at most one reservation over.
        assert spent <= 0.001 + 0.0007


async def test_429_opens_breaker_and_traffic_moves_to_next_provider(world: World) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(429, headers={"retry-after": "1"},
                                              json={"message": "rate limited"})
    backup_world(world, lambda req: httpx.Response(
        200, json=completion("backup-small", "backup answer")))
    async with router(world, brain_config()) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code == 200 and r.headers["x-spillover-backend"] == "backup"
        assert r.headers["x-spillover-reason"] == "failover"
        hits = len(world.bodies("hosted"))
        assert hits == 1  # a 429 opens the breaker at once: no second try there
        status = (await c.get("/status", headers=auth("admin"))).json()
        breaker = status["breakers"]["mistral:mistral-small-latest"]
        assert breaker["state"] == "open" and breaker["retry_in_s"] > 25
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.headers["x-spillover-backend"] == "backup"
        assert len(world.bodies("hosted")) == hits  # the open breaker kept it away
        explain = (await c.post("/v1/route/explain", json=CHAT, headers=auth("alice"))).json()
        skipped = {f["backend"]: f["reason"] for f in explain["filtered"]}
        assert skipped["mistral:mistral-small-latest"] == "unavailable"


async def test_5xx_retried_with_backoff_then_next(world: World) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(503, json={"message": "overloaded"})
    backup_world(world, lambda req: httpx.Response(
        200, json=completion("backup-small", "backup answer")))
    async with router(world, brain_config()) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.headers["x-spillover-backend"] == "backup"
        assert len(world.bodies("hosted")) == 2  # attempts_per_target


async def test_stalled_upstream_ends_within_deadline(world: World) -> None:
    world.local_up = False

    def stall(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("stalled", request=req)

    world.hosted = stall
    backup_world(world, stall)
    data = brain_config()
    data["server"]["request_timeout_s"] = 1
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code in (502, 504)
        assert r.json()["error"]["type"] in ("upstream_error", "timeout_error")


async def test_explain_shows_candidates_filters_and_plan(world: World) -> None:
    world.waiting = 5
    async with router(world, brain_config()) as c:
        r = await c.post("/v1/route/explain", json={**CHAT, "max_tokens": 50},
                         headers=auth("alice"))
        assert r.status_code == 200
        out = r.json()
        assert out["caller"] == "alice"
        assert [cand["backend"] for cand in out["candidates"]] == [
            "demo-local", "mistral:mistral-small-latest", "backup:backup-small"]
        assert out["filtered"][0]["reason"] == "local-saturated"
        assert out["plan"]["route"] == "hosted" and out["plan"]["reason"] == "local-saturated"
        # Cheapest hosted first.
        assert out["plan"]["targets"][:2] == ["mistral:mistral-small-latest",
                                              "backup:backup-small"]
        assert out["load"]["demo-local"]["saturated"] is True
        assert world.bodies("hosted") == [] and world.bodies("backup") == []
        r = await c.post("/v1/route/explain", json={**CHAT, "model": "research"},
                         headers=auth("alice"))
        assert r.json()["plan"]["refusal"]["code"] == "license"


async def test_status_needs_admin_and_shows_hardware(world: World) -> None:
    async with router(world, brain_config()) as c:
        assert_openai_error(await c.get("/status", headers=auth("alice")), 403)
        assert_openai_error(await c.get("/status"), 401)
        st = (await c.get("/status", headers=auth("admin"))).json()
        assert st["gpu"]["available"] is False and st["gpu"]["reason"]
        assert st["host"]["cpu_count"] >= 1
        ready = (await c.get("/readyz", headers=auth("admin"))).json()
        assert "gpu" in ready and "host" in ready


async def test_rate_limit_is_429_with_retry_after(world: World) -> None:
    data = brain_config()
    data["callers"]["alice"]["rate_limit"] = {"requests_per_minute": 2}
    async with router(world, data) as c:
        codes = [(await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice")))
                 for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1
        # Others are not affected.
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("lab"))
        assert r.status_code == 200


async def test_one_access_log_line_per_request(world: World,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spillover.access")
    async with router(world, brain_config()) as c:
        await c.post("/v1/chat/completions", json=CHAT,
                     headers={**auth("alice"), "x-request-id": "rid-1"})
        await c.post("/v1/chat/completions", json=CHAT,
                     headers={"authorization": "Bearer sk-wrong", "x-request-id": "rid-2"})
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "spillover.access"]
    # A request refused before routing gets no line of its own: a sampled line counts them.
    ok, bad = lines
    assert ok["request_id"] == "rid-1"
    assert ok["caller"] == "alice" and ok["route"] == "local" and ok["status"] == 200
    assert ok["reason"] == "local-ok" and ok["prompt_tokens"] == 10
    assert bad["refused_before_routing"] == 1
    assert bad["last"] == {"request_id": "rid-2", "status": 401, "reason": "invalid_api_key"}
    assert "sk-wrong" not in caplog.text and "sk-test-secret" not in caplog.text


async def test_open_mode_warns_loudly(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    data = yaml.safe_load(BASE_YAML)
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
    assert "OPEN" in caplog.text


async def test_a_stream_stalled_into_its_deadline_ends_as_the_deadline(world: World) -> None:
    """A hosted stream that stalls after its first chunk. The read timeout is bounded by
    the request's deadline, so the two fire together, and which one the router sees first
    is a matter of milliseconds (a busy process: here the read outlasts the deadline with
    the loop blocked, then fails): either way the caller is told the deadline passed (504
    in the stream), not that the upstream broke off (the e2e test's flake)."""
    world.local_up = False

    async def stalled() -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(chunk("mistral-small-latest", "Hel")).encode() + b"\n\n"
        time.sleep(1.2)  # noqa: ASYNC251 (deliberate: past the deadline, the loop blocked)
        raise httpx.ReadTimeout("stalled")

    world.hosted = lambda req: httpx.Response(  # type: ignore[assignment]
        200, headers={"content-type": "text/event-stream"}, content=stalled())
    data = brain_config()
    data["server"]["request_timeout_s"] = 1
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True},
                         headers=auth("alice"))
        assert r.status_code == 200  # the stream had begun
        assert "Hel" in r.text and "passed its deadline mid-stream" in r.text, r.text
        assert "broke off" not in r.text
