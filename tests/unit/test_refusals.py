"""Refusals through the gateway: keyless warm-up, permanent vs retryable, the breaker and
one caller's oversized request, provider keys echoed by an upstream (MockTransport)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.unit.helpers import (
    CHAT,
    World,
    assert_openai_error,
    auth,
    brain_config,
    chunk,
    completion,
    gateway_app,
    lifespan_client,
    router,
    router_app,
)


@dataclass
class _Proc:
    started_at: float
    running: bool = True


@dataclass
class _Supervisor:
    engines: dict[str, _Proc]

    def note(self, name: str) -> None:
        return None


async def test_warm_up_without_a_key_is_503_local_starting(world: World) -> None:
    world.local_up = False  # the engine's port does not answer yet
    app = gateway_app(world, env={})
    rt = app.state.runtime
    async with lifespan_client(app) as c:
        rt.supervisor = _Supervisor({"demo-local": _Proc(time.monotonic() - 30)})
        await rt.monitor.refresh()
        r = await c.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 503)
        assert err["code"] == "local_starting"
        msg = str(err["message"])
        assert "'demo-local' is starting" in msg and "no hosted fallback" in msg
        assert "$MISTRAL_API_KEY is not set" in msg
        assert f"retry in {r.headers['retry-after']} s" in msg
        assert world.bodies("hosted") == []  # never tried without a key
        explain = (await c.post("/v1/route/explain", json=CHAT)).json()
        reasons = {x["backend"]: x["reason"] for x in explain["filtered"]}
        assert reasons == {"mistral:mistral-small-latest": "no-api-key",
                           "demo-local": "local-down"}
        # Up once: the next start has an expected readiness, its Retry-After.
        world.local_up = True
        await rt.monitor.refresh()
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        took = rt._ready_after["demo-local"]
        assert 29 < took < 60
        world.local_up = False  # it crashed; the supervisor starts it again
        rt.supervisor = _Supervisor({"demo-local": _Proc(time.monotonic())})
        await rt.monitor.refresh()
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert assert_openai_error(r, 503)["code"] == "local_starting"
        expect = int(r.headers["retry-after"])
        assert abs(expect - took) <= 2
        assert f"about {expect} s" in r.json()["error"]["message"]


async def test_down_engine_that_nobody_starts_is_not_called_starting(world: World) -> None:
    world.local_up = False
    async with lifespan_client(gateway_app(world, env={})) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 503)
        assert err["code"] == "no_backend" and r.headers["retry-after"]
        assert "no API key" not in str(err["message"])


async def test_on_prem_prompt_over_every_local_context_is_400(world: World) -> None:
    async with router(world, brain_config()) as c:
        long = {**CHAT, "messages": [{"role": "user", "content": "word " * 4000}]}
        for headers in (auth("vault"), {**auth("alice"), "x-spillover-residency": "onprem"}):
            r = await c.post("/v1/chat/completions", json=long, headers=headers)
            err = assert_openai_error(r, 400)
            assert err["code"] == "context_length_exceeded"
            assert "2048 tokens" in str(err["message"])
            assert "retry-after" not in r.headers
    assert world.bodies("hosted") == [] and world.bodies("local") == []


TPM = {"error": {"message": "Request too large for gpt-4o in organization org-x on tokens "
                            "per min (TPM): Limit 30000, Requested 50000. The input or output "
                            "tokens must be reduced in order to run successfully.",
                 "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}


@pytest.mark.parametrize("answer", [
    httpx.Response(429, json=TPM),
    httpx.Response(429, json={"type": "error", "error": {"type": "request_too_large",
                                                         "message": "too big"}}),
])
async def test_a_request_too_large_does_not_open_the_shared_breaker(
        world: World, answer: httpx.Response) -> None:
    world.local_up = False
    data = brain_config()
    data["aliases"]["demo"]["hosted"] = data["aliases"]["demo"]["hosted"][:1]
    data["routing"]["breaker_failures"] = 1
    async with router_app(world, data) as (c, rt):
        world.hosted = lambda req: answer if len(req.content) > 5000 else httpx.Response(
            200, json=completion("mistral-small-latest", "ok"))
        big = {**CHAT, "messages": [{"role": "user", "content": "x " * 3000}]}
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json=big, headers=auth("alice"))
            err = assert_openai_error(r, 413)
            assert err["code"] == "request_too_large" and "retry-after" not in r.headers
        assert len(world.bodies("hosted")) == 3  # once each: never retried there
        assert rt.breakers.get("mistral:mistral-small-latest").state == "closed"
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("bob"))
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "hosted"


async def test_rate_limit_429_still_opens_it_and_retry_after_is_the_true_wait(
        world: World) -> None:
    world.local_up = False
    world.hosted = lambda req: httpx.Response(429, headers={"retry-after": "13.9"},
                                              json={"message": "Requests rate limit exceeded"})
    data = brain_config()
    data["aliases"]["demo"]["hosted"] = data["aliases"]["demo"]["hosted"][:1]
    data["routing"]["breaker_cooldown_s"] = 2
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code == 429
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("bob"))
            err = assert_openai_error(r, 503)
            assert err["code"] == "circuit_open"
            wait = int(r.headers["retry-after"])
            assert 12 <= wait <= 14  # 13.9 s, rounded up, less the time since
            assert f"retry in {wait} s" in str(err["message"])
    assert len(world.bodies("hosted")) == 1


async def test_provider_keys_echoed_by_an_upstream_are_scrubbed(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    world.local_up = False

    def echo(req: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {
            "message": f"bad header Authorization: {req.headers['authorization']} "
                       f"(key sk-test-secret)", "type": "invalid_request_error"}})

    world.hosted = echo
    data = brain_config()
    data["aliases"]["demo"]["hosted"] = data["aliases"]["demo"]["hosted"][:1]
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        err = assert_openai_error(r, 400)
        assert "sk-test-secret" not in r.text and "[redacted]" in str(err["message"])
        async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                            headers=auth("alice")) as s:
            body = (await s.aread()).decode()
        assert s.status_code == 400 and "sk-test-secret" not in body
        # A 429 too large, relayed as 413, is scrubbed as well.
        world.hosted = lambda req: httpx.Response(429, json={"error": {
            "message": f"Request too large for {req.headers['authorization']}",
            "code": "request_too_large"}})
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert assert_openai_error(r, 413)["code"] == "request_too_large"
        assert "sk-test-secret" not in r.text and "[redacted]" in r.text
        # An error event in the middle of a stream that was answered 200.

        def mid_stream(req: httpx.Request) -> httpx.Response:
            events = [chunk("m", "Hi"), {"error": {
                "message": f"backend lost (sent {req.headers['authorization']})",
                "type": "server_error"}}]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            return httpx.Response(200, content=sse.encode(),
                                  headers={"content-type": "text/event-stream"})

        world.hosted = mid_stream
        async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                            headers=auth("alice")) as s:
            body = (await s.aread()).decode()
        assert s.status_code == 200 and "backend lost" in body
        assert "sk-test-secret" not in body and "[redacted]" in body
    assert "sk-test-secret" not in caplog.text
