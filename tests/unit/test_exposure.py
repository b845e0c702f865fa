"""What a caller with a key, and a stranger without one, can see and leave behind: repeated
policy headers, refusals before routing (metrics, not the ledger), /readyz, /metrics and
explain (upstreams faked with MockTransport)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.errors import InvalidRequest
from router.http.inbound import facts_for
from router.routing.auth import key_digest
from tests.unit.helpers import (
    CHAT,
    World,
    assert_openai_error,
    auth,
    brain_config,
    router,
    router_app,
)

METRICS_TOKEN = "prom-scrape-token-1"
BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# -- repeated policy headers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "onprem"),
    [(["any", "onprem"], True), (["onprem", "any"], True), (["any", "any"], False),
     (["any, onprem"], True), (["onprem"], True), ([""], False), ([], False)],
)
def test_residency_strictest_wins(values: list[str], onprem: bool) -> None:
    from router.routing.gateway import header_map

    raw = [(b"x-spillover-residency", v.encode()) for v in values]
    assert facts_for("chat", dict(BODY), header_map(raw)).onprem_only is onprem


@pytest.mark.parametrize(
    ("values", "force"),
    [(["hosted", "hosted"], "hosted"), (["local"], "local"), (["Local", " local"], "local"),
     ([], "auto")],
)
def test_repeated_route_with_one_value(values: list[str], force: str) -> None:
    from router.routing.gateway import header_map

    raw = [(b"x-spillover-route", v.encode()) for v in values]
    assert facts_for("chat", dict(BODY), header_map(raw)).force == force


@pytest.mark.parametrize("values", [["local", "hosted"], ["hosted", "auto"], ["local,hosted"],
                                    ["local", "nowhere"], ["any", "onprem", "elsewhere"]])
def test_conflicting_or_bad_repeated_policy_headers_are_400(values: list[str]) -> None:
    from router.routing.gateway import header_map

    name = b"x-spillover-residency" if "any" in values else b"x-spillover-route"
    with pytest.raises(InvalidRequest) as info:
        facts_for("chat", dict(BODY), header_map([(name, v.encode()) for v in values]))
    assert info.value.param == name.decode()


def test_other_repeated_headers_keep_the_first() -> None:
    from router.routing.gateway import header_map

    h = header_map([(b"x-request-id", b"a"), (b"x-request-id", b"b"),
                    (b"content-type", b"application/json")])
    assert h == {"x-request-id": "a", "content-type": "application/json"}


async def test_appended_onprem_is_not_ignored(world: World) -> None:
    """`any` followed by an `onprem` a proxy appended was served hosted: the first won."""
    world.waiting = 5  # saturated: without residency it would spill to hosted
    data = brain_config(routing={"residency_max_wait_s": 0.1})
    async with router(world, data) as c:
        dup = [("authorization", "Bearer sk-alice-1"), ("x-spillover-residency", "any"),
               ("x-spillover-residency", "onprem")]
        r = await c.post("/v1/chat/completions", json=CHAT, headers=dup)
        assert r.status_code == 503, r.text
        assert world.bodies("hosted") == []
        explain = (await c.post("/v1/route/explain", json=CHAT, headers=dup)).json()
        assert explain["request"]["onprem_only"] is True
        r = await c.post("/v1/chat/completions", json=CHAT, headers=[
            ("authorization", "Bearer sk-alice-1"), ("x-spillover-route", "local"),
            ("x-spillover-route", "hosted")])
        assert assert_openai_error(r, 400)["code"] == "conflicting_headers"
        assert world.bodies("hosted") == [] and world.bodies("local") == []


# -- refused before routing ------------------------------------------------------------


async def test_keyless_flood_is_counted_not_written() -> None:
    """6,000 keyless requests added 6,000 ledger rows (caller anonymous, status 401) and
    filled the dashboard's latest decisions."""
    world = World()
    data = brain_config()
    data["callers"]["alice"]["rate_limit"] = {"requests_per_minute": 1}
    async with router_app(world, data) as (c, rt):
        for _ in range(200):
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 401
        for _ in range(20):
            r = await c.post("/v1/chat/completions", json=CHAT,
                             headers={"authorization": "Bearer sk-wrong"})
            assert r.status_code == 401
        for _ in range(5):  # bad input with a good key
            r = await c.post("/v1/chat/completions", json={"model": "demo"},
                             headers=auth("bob"))
            assert r.status_code == 400
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "research"},
                         headers=auth("bob"))
        assert r.status_code == 404
        codes = [(await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice")))
                 .status_code for _ in range(3)]
        assert codes == [200, 429, 429]
        rows = rt.ledger.rows(since=0, until=time.time() + 60)
        assert [(row.caller, row.status) for row in rows] == [("alice", 200)]
        status = (await c.get("/status", headers=auth("admin"))).json()
        assert [d["status"] for d in status["recent"]] == [200]
        text = (await c.get("/metrics", headers=auth("admin"))).text
        assert metric(text, "spillover_requests_total", status="401",
                      reason="missing_api_key") == 200
        assert metric(text, "spillover_requests_total", status="401",
                      reason="invalid_api_key") == 20
        assert metric(text, "spillover_requests_total", status="400") == 5
        assert metric(text, "spillover_requests_total", status="404") == 1
        assert metric(text, "spillover_requests_total", status="429") == 2
        assert metric(text, "spillover_requests_total", status="200") == 1


async def test_a_routing_refusal_is_still_a_ledger_row(world: World) -> None:
    """Budget, residency, licence: decisions about a known caller's request, kept."""
    async with router_app(world, brain_config()) as (c, rt):
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "research"},
                         headers=auth("alice"))  # MRL weights, commercial caller
        assert r.status_code == 403
        rows = rt.ledger.rows(since=0, until=time.time() + 60)
        assert [(row.caller, row.status) for row in rows] == [("alice", 403)]


# -- what is visible without a key ---------------------------------------------------


async def test_readyz_is_bare_without_the_admin_key(world: World) -> None:
    async with router(world, brain_config()) as c:
        for headers in ({}, auth("alice"), {"authorization": "Bearer sk-wrong"}):
            r = await c.get("/readyz", headers=headers)
            assert r.status_code == 200 and r.json() == {"ready": True}
            assert "research" not in r.text and "demo-local" not in r.text
        full = (await c.get("/readyz", headers=auth("admin"))).json()
        assert full["ready"] is True and set(full["aliases"]) == {"demo", "research"}
        assert "demo-local" in full["engines"] and "host" in full
        assert (await c.get("/healthz")).json() == {"status": "ok"}


async def test_readyz_not_ready_is_503_either_way(world: World) -> None:
    world.local_up = False
    async with router(world, brain_config()) as c:
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = await c.get("/readyz", headers=auth("admin"))
        assert r.status_code == 503 and "aliases" in r.json()


@pytest.mark.parametrize(
    ("server", "headers", "status"),
    [
        ({}, {}, 401),
        ({}, {"authorization": "Bearer sk-alice-1"}, 403),
        ({}, {"authorization": "Bearer sk-admin-5"}, 200),
        ({"metrics_token_sha256": [key_digest(METRICS_TOKEN)]},
         {"authorization": f"Bearer {METRICS_TOKEN}"}, 200),
        ({"metrics_token_sha256": [key_digest(METRICS_TOKEN)]}, {}, 401),
        ({"metrics_public": True}, {}, 200),
    ],
)
async def test_metrics_needs_the_admin_key_or_a_token(world: World, server: dict[str, Any],
                                                     headers: dict[str, str],
                                                     status: int) -> None:
    """/metrics named every caller with its spend and budget."""
    data = brain_config()
    data["server"] = {"request_timeout_s": 5, "metrics_interval_s": 60,
                      "ledger_path": ":memory:", **server}
    async with router(world, data) as c:
        await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        r = await c.get("/metrics", headers=headers)
        assert r.status_code == status, r.text
        if status == 200:
            assert "spillover_requests_total" in r.text
        else:
            assert "alice" not in r.text and "spillover_" not in r.text


async def test_open_mode_keeps_everything_open_for_local_development(world: World) -> None:
    data = {k: v for k, v in brain_config().items()
            if k not in ("callers", "admin_key_sha256")}
    async with router(world, data) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert "engines" in (await c.get("/readyz")).json()


async def test_explain_shows_only_the_callers_alias(world: World) -> None:
    """Explain returned every engine's load and every upstream's breaker."""
    async with router_app(world, brain_config()) as (c, rt):
        rt.breakers.get("mistral:mistral-small-latest")  # demo's upstream has a breaker
        out = (await c.post("/v1/route/explain", json={**CHAT, "model": "research"},
                            headers=auth("lab"))).json()
        assert set(out["load"]) == {"large-local"}
        assert out["breakers"] == {}
        assert "demo-local" not in str(out) and "mistral" not in str(out)
        out = (await c.post("/v1/route/explain", json=CHAT, headers=auth("bob"))).json()
        assert set(out["load"]) == {"demo-local"}
        assert set(out["breakers"]) == {"mistral:mistral-small-latest"}
        assert "large-local" not in str(out)


async def test_admin_key_cannot_call_models(world: World) -> None:
    """The admin key worked as a caller key with every alias, forced routes, no limit."""
    async with router(world, brain_config()) as c:
        for path in ("/v1/chat/completions", "/v1/route/explain"):
            r = await c.post(path, json=CHAT, headers={**auth("admin"),
                                                        "x-spillover-route": "hosted"})
            assert assert_openai_error(r, 403)["code"] == "admin_key_not_a_caller"
        assert world.bodies("hosted") == [] and world.bodies("local") == []
        assert (await c.get("/status", headers=auth("admin"))).status_code == 200
        usage = await c.get("/v1/usage", headers=auth("admin"))
        assert usage.status_code == 200

