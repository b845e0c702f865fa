"""Tiered aliases through the gateway (ASGI, upstreams faked with MockTransport): the
tier's own plan, headers, explain, /v1/models, lowering to a usable tier, the cascade."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from router.app import Settings, create_app
from tests.unit.helpers import BASE_YAML, World, completion, config

TIERED_YAML = BASE_YAML + """\
  flagship:
    hosted:
      - provider: mistral
        model: mistral-large-latest
        price: {input_per_mtok: 2, output_per_mtok: 6}
  auto:
    tiers: [demo, flagship]
    thresholds: [0.45]
callers:
  app: {key_sha256: ["%(app)s"]}
  onprem: {key_sha256: ["%(onprem)s"], residency: onprem}
  pinner: {key_sha256: ["%(pinner)s"], may_pin_tier: true}
  capped: {key_sha256: ["%(capped)s"], max_tier: 1}
"""
KEYS = {name: f"sk-{name}-0123456789" for name in ("app", "onprem", "pinner", "capped")}


def _digest(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def tiered_config() -> Any:
    return config(TIERED_YAML % {n: _digest(k) for n, k in KEYS.items()})


HARD = ("Explain step by step why this fails, then prove the fix and compare the "
        "trade-offs:\n```py\nx = 1\n```\n```py\ny = 2\n```")
EASY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
HARD_BODY = {"model": "auto", "max_tokens": 2000,
             "messages": [{"role": "user", "content": HARD}]}
PERSON = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
def world() -> World:
    return World()


async def _client(world: World, env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(env=env), config=tiered_config(), transport=world.transport())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router"
    ) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(world, {"MISTRAL_API_KEY": "sk-test-secret"}):
        yield c


@pytest.fixture
async def keyless(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(world, {}):
        yield c


def flagship_calls(world: World) -> list[dict[str, Any]]:
    return [b for b in world.bodies("hosted") if b["model"] == "mistral-large-latest"]


async def test_everyday_request_stays_on_the_first_tier(client: httpx.AsyncClient,
                                                        world: World) -> None:
    r = await client.post("/v1/chat/completions", json=EASY, headers=auth("app"))
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-tier"] == "demo"
    assert r.headers["x-spillover-escalation"].startswith("none; score=0.")
    assert r.headers["x-spillover-route"] == "local"
    assert world.bodies("local")[0]["model"] == "demo"  # the tier's model, not "auto"


async def test_hard_request_escalates_to_the_flagship(client: httpx.AsyncClient,
                                                      world: World) -> None:
    r = await client.post("/v1/chat/completions", json=HARD_BODY, headers=auth("app"))
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-tier"] == "flagship"
    assert r.headers["x-spillover-escalation"].startswith("score; score=")
    assert r.headers["x-spillover-route"] == "hosted"
    assert len(flagship_calls(world)) == 1 and not world.bodies("local")


async def test_on_prem_caller_is_kept_local_never_sent_out(client: httpx.AsyncClient,
                                                           world: World) -> None:
    r = await client.post("/v1/chat/completions", json=HARD_BODY, headers=auth("onprem"))
    assert r.status_code == 200, r.text
    assert (r.headers["x-spillover-tier"], r.headers["x-spillover-route"]) == ("demo", "local")
    assert r.headers["x-spillover-escalation"].startswith("lower;")
    assert not world.bodies("hosted")


async def test_without_a_key_the_flagship_gives_way_to_the_everyday_tier(
        keyless: httpx.AsyncClient, world: World) -> None:
    r = await keyless.post("/v1/chat/completions", json=HARD_BODY, headers=auth("app"))
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-tier"] == "demo"
    assert r.headers["x-spillover-escalation"].startswith("lower;")


async def test_pin_and_cap(client: httpx.AsyncClient, world: World) -> None:
    r = await client.post("/v1/chat/completions", json=EASY,
                          headers={**auth("pinner"), "x-spillover-tier": "flagship"})
    assert (r.status_code, r.headers["x-spillover-tier"]) == (200, "flagship")
    assert r.headers["x-spillover-escalation"].startswith("pinned;")
    r = await client.post("/v1/chat/completions", json=EASY,
                          headers={**auth("app"), "x-spillover-tier": "flagship"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "tier_pin_not_allowed"
    r = await client.post("/v1/chat/completions", json=HARD_BODY, headers=auth("capped"))
    assert (r.status_code, r.headers["x-spillover-tier"]) == (200, "demo")
    assert r.headers["x-spillover-escalation"].startswith("capped;")
    assert len(flagship_calls(world)) == 1  # the pinned one only


async def test_models_lists_the_tiered_alias(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers=auth("app"))
    assert {m["id"] for m in r.json()["data"]} >= {"demo", "flagship", "auto"}


async def test_explain_shows_the_tier_before_the_tier_plan(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/route/explain", json=HARD_BODY, headers=auth("app"))
    assert r.status_code == 200, r.text
    out = r.json()
    keys = list(out)
    assert keys.index("tier") < keys.index("candidates") < keys.index("plan")
    tier = out["tier"]
    assert tier["chosen"] == "flagship" and tier["thresholds"] == [0.45]
    contributions = sum(f["contribution"] for f in tier["features"].values())
    assert tier["score"] == pytest.approx(min(1.0, contributions), abs=1e-3)
    assert tier["features"]["reasoning"]["contribution"] > 0
    assert out["request"]["alias"] == "flagship"
    assert out["plan"]["targets"] == ["mistral:mistral-large-latest"]


async def test_cascade_resends_a_failed_schema_answer_one_tier_up(
        client: httpx.AsyncClient, world: World) -> None:
    world.local = lambda req: httpx.Response(200, json=completion("demo", "no json here"))
    world.hosted = lambda req: httpx.Response(
        200, json=completion(json.loads(req.content)["model"], '{"name": "Ada"}'))
    body = {**EASY, "response_format": PERSON}
    r = await client.post("/v1/chat/completions", json=body, headers=auth("app"))
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"name": "Ada"}
    assert r.headers["x-spillover-tier"] == "flagship"
    assert r.headers["x-spillover-escalation"].startswith("cascade-json-schema;")
    assert r.headers["x-spillover-escalation"].endswith("from=demo")
    assert len(world.bodies("local")) == 1 and len(flagship_calls(world)) == 1
    ledger = client.app.state.runtime.ledger  # type: ignore[attr-defined]
    rows = [row for row in ledger.rows(since=0, until=2e9) if row.request_id ==
            r.headers["x-request-id"]]
    assert [(row.tier, row.wasted) for row in rows] == [("demo", "json-schema"),
                                                       ("flagship", "")]
    assert rows[0].score is not None


async def test_a_valid_answer_is_not_cascaded(client: httpx.AsyncClient, world: World) -> None:
    world.local = lambda req: httpx.Response(200, json=completion("demo", '{"name": "Bo"}'))
    r = await client.post("/v1/chat/completions", json={**EASY, "response_format": PERSON},
                          headers=auth("app"))
    assert (r.status_code, r.headers["x-spillover-tier"]) == (200, "demo")
    assert not world.bodies("hosted")


async def test_a_streamed_request_is_never_cascaded(client: httpx.AsyncClient,
                                                    world: World) -> None:
    from tests.unit.helpers import chunk, sse

    world.local = lambda req: httpx.Response(
        200, content=sse([chunk("demo", "no json"), chunk("demo", usage=(3, 2))]),
        headers={"content-type": "text/event-stream"})
    body = {**EASY, "response_format": PERSON, "stream": True}
    r = await client.post("/v1/chat/completions", json=body, headers=auth("app"))
    assert (r.status_code, r.headers["x-spillover-tier"]) == (200, "demo")
    assert not world.bodies("hosted")


async def test_sticky_conversation_through_the_gateway(client: httpx.AsyncClient,
                                                       world: World) -> None:
    first = {**HARD_BODY, "messages": [{"role": "system", "content": "s"}, *HARD_BODY["messages"]]}
    r = await client.post("/v1/chat/completions", json=first, headers=auth("app"))
    assert r.headers["x-spillover-tier"] == "flagship"
    follow = {"model": "auto", "messages": [*first["messages"],
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": "thanks"}]}
    r = await client.post("/v1/chat/completions", json=follow, headers=auth("app"))
    assert r.headers["x-spillover-tier"] == "flagship"
    assert r.headers["x-spillover-escalation"].startswith("sticky;")


async def test_prometheus_counts_calls_by_tier_and_reason(client: httpx.AsyncClient,
                                                          world: World) -> None:
    world.local = lambda req: httpx.Response(200, json=completion("demo", "no json"))
    await client.post("/v1/chat/completions", json=EASY, headers=auth("app"))
    await client.post("/v1/chat/completions", json=HARD_BODY, headers=auth("app"))
    await client.post("/v1/chat/completions", json={**EASY, "response_format": PERSON},
                      headers=auth("app"))
    text = client.app.state.runtime.metrics.render().decode()  # type: ignore[attr-defined]
    assert 'spillover_tier_requests_total{reason="none",tier="demo"} 2.0' in text
    assert 'spillover_tier_requests_total{reason="score",tier="flagship"} 1.0' in text
    assert ('spillover_tier_requests_total{reason="cascade-json-schema",tier="flagship"} 1.0'
            in text)
    assert 'spillover_tier_cost_usd_total{tier="flagship"}' in text


async def test_status_counts_calls_per_tier_and_what_escalation_cost(
        client: httpx.AsyncClient, world: World) -> None:
    world.local = lambda req: httpx.Response(200, json=completion("demo", "no json"))
    world.hosted = lambda req: httpx.Response(
        200, json=completion(json.loads(req.content)["model"], '{"name": "Ada"}'))
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.status()["tiers"]["calls"] == 0
    for body in (EASY, EASY, HARD_BODY, {**EASY, "response_format": PERSON}):
        r = await client.post("/v1/chat/completions", json=body, headers=auth("app"))
        assert r.status_code == 200, r.text
    t = runtime.status()["tiers"]
    assert t["aliases"] == {"auto": ["demo", "flagship"]}
    # Four answers: two everyday, one scored up, one cascaded up (its wasted first call
    # is counted apart, not as a fifth answer).
    assert t["calls"] == 4
    demo, flagship = t["tiers"]["demo"], t["tiers"]["flagship"]
    assert (demo["calls"], flagship["calls"]) == (2, 2)
    assert demo["share"] == flagship["share"] == 0.5
    assert t["reasons"] == {"none": 2, "score": 1, "cascade-json-schema": 1}
    assert (demo["escalated"], flagship["escalated"], t["escalated"]) == (0, 2, 2)
    assert (demo["wasted"], flagship["wasted"], t["wasted"]) == (1, 0, 1)
    assert flagship["cost_usd"] > 0  # the flagship's price, on both of its answers
    assert t["escalated_cost_usd"] == pytest.approx(flagship["cost_usd"])
    assert t["wasted_usd"] == pytest.approx(demo["wasted_usd"])
    ledger = runtime.ledger.rows(since=0, until=2e9)
    assert t["wasted_usd"] == pytest.approx(sum(r.cost_usd for r in ledger if r.wasted))


async def test_a_messages_request_to_claude_is_cascaded_on_claudes_own_answer() -> None:
    """A Messages request passed through natively to an `anthropic` provider in a tiered
    alias: the cascade reads Claude's Message (not a chat completion), and the request
    one tier up goes to Claude natively too, so the caller gets a Message."""
    import yaml

    from router.routing.auth import key_digest
    from tests.fakes.anthropic import DEFAULT_API_KEY, FakeAnthropic

    claude_url = "https://api.anthropic.test/v1"
    data = yaml.safe_load(BASE_YAML)
    data["providers"]["claude"] = {"kind": "anthropic", "base_url": claude_url,
                                   "api_key_env": "ANTHROPIC_API_KEY"}
    for name, model in (("haiku", "claude-haiku-4-5"), ("sonnet", "claude-sonnet-4-5")):
        data["aliases"][name] = {"hosted": [{"provider": "claude", "model": model,
                                             "price": {"input_per_mtok": 1,
                                                       "output_per_mtok": 5}}]}
    data["aliases"]["claude-auto"] = {"tiers": ["haiku", "sonnet"], "thresholds": [0.9]}
    data["callers"] = {"app": {"key_sha256": [key_digest(KEYS["app"])]}}
    claude = FakeAnthropic()
    world = World()
    plain = world.transport()

    def route(req: httpx.Request) -> httpx.Response:
        if not str(req.url).startswith(claude_url):
            return plain.handler(req)  # type: ignore[return-value]
        resp = claude.handle(req)
        if json.loads(req.content)["model"] == "claude-haiku-4-5" and resp.status_code == 200:
            # The small model calls a tool it was not offered.
            message = resp.json()
            message["content"][0]["name"] = "launch_rockets"
            return httpx.Response(200, json=message)
        return resp

    app = create_app(Settings(env={"ANTHROPIC_API_KEY": DEFAULT_API_KEY}),
                     config=config(yaml.safe_dump(data)), transport=httpx.MockTransport(route))
    body = {"model": "claude-auto", "max_tokens": 64, "metadata": {"user_id": "u-7"},
            "messages": [{"role": "user", "content": "weather in Paris?"}],
            "tools": [{"name": "get_weather", "description": "weather of a city",
                       "input_schema": {"type": "object",
                                        "properties": {"city": {"type": "string"}}}}]}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        r = await c.post("/v1/messages", json=body, headers={"x-api-key": KEYS["app"],
                                                             "anthropic-version": "2023-06-01"})
        rows = app.state.runtime.ledger.rows(since=0, until=2e9)
    assert r.status_code == 200, r.text
    assert r.headers["x-spillover-tier"] == "sonnet"
    assert r.headers["x-spillover-escalation"].startswith("cascade-tool-unknown;")
    out = r.json()
    # Claude's own Message, as it came from the tier above.
    assert out["type"] == "message" and out["id"].startswith("msg_fake")
    assert out["content"][0]["name"] == "get_weather" and out["stop_reason"] == "tool_use"
    sent = [b for _, b in claude.requests]
    assert [b["model"] for b in sent] == ["claude-haiku-4-5", "claude-sonnet-4-5"]
    # Both calls natively: the caller's body, model swapped (metadata kept as sent).
    assert all(b["metadata"] == {"user_id": "u-7"} for b in sent)
    assert all(b["tools"] == body["tools"] for b in sent)
    assert [(row.tier, row.wasted) for row in rows] == [("haiku", "tool-unknown"),
                                                       ("sonnet", "")]
