"""Traffic classes through the gateway: the caller's policy and x-spillover-priority pick
the class, local engines get vLLM's `priority` for it, hosted providers never do, and
explain, headers, ledger, metrics and the dashboard's feed show it (upstreams faked)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.accounting.ledger import Ledger
from router.app import Settings, create_app
from router.config import Config, ConfigError, parse_config
from router.routing.auth import key_digest
from router.routing.catalog import Catalog
from serving.engine import deployment_spec, engine_command
from tests.unit.helpers import BASE_YAML, World

KEY = "sk-app-priority"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}


def cfg(caller: dict[str, Any] | None = None, **local: Any) -> Config:
    data = yaml.safe_load(BASE_YAML)
    data["callers"] = {"app": {"key_sha256": [key_digest(KEY)], **(caller or {})}}
    data["routing"] = {"batch_max_wait_s": 0, "cost_first_max_wait_s": 0}
    data["aliases"]["demo"]["local"][0].update(local)
    return parse_config(yaml.safe_dump(data))


@asynccontextmanager
async def router(world: World, config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=config,
                     transport=world.transport())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router"
    ) as c:
        yield c, app.state.runtime


async def chat(c: httpx.AsyncClient, body: dict[str, Any] | None = None,
               headers: Any = None) -> httpx.Response:
    h: Any = list(AUTH.items()) + (list(headers) if headers else [])
    return await c.post("/v1/chat/completions", json=body or CHAT, headers=h)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- which class ------------------------------------------------------------------------


async def test_class_is_the_policy_default_and_the_header_may_lower_it() -> None:
    world = World()
    async with router(world, cfg({"priority": "standard"})) as (c, rt):
        r = await chat(c)
        assert r.status_code == 200, r.text
        assert r.headers["x-spillover-priority"] == "standard"
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        assert r.headers["x-spillover-priority"] == "batch"
        # Below the caller's ceiling (interactive by default), raising the default is fine.
        r = await chat(c, headers=[("x-spillover-priority", "interactive")])
        assert r.headers["x-spillover-priority"] == "interactive"
        assert [b["priority"] for b in world.bodies("local")] == [1, 2, 0]
        rows = rt.ledger.rows(since=0, until=time.time() + 60)
        assert [row.priority for row in rows] == ["standard", "batch", "interactive"]


async def test_a_class_above_the_policy_ceiling_is_403() -> None:
    world = World()
    async with router(world, cfg({"max_priority": "standard"})) as (c, _):
        r = await chat(c, headers=[("x-spillover-priority", "interactive")])
        err = error(r, 403)
        assert err["code"] == "priority_not_allowed"
        assert err["param"] == "x-spillover-priority"
        assert "may not send interactive traffic" in err["message"]
        assert "standard, batch" in err["message"]
        assert world.bodies("local") == []
        r = await chat(c)  # its default: its ceiling
        assert r.headers["x-spillover-priority"] == "standard"


async def test_repeated_header_takes_the_lowest_class_and_bad_values_are_400() -> None:
    world = World()
    async with router(world, cfg()) as (c, _):
        r = await chat(c, headers=[("x-spillover-priority", "interactive"),
                                   ("x-spillover-priority", "batch")])
        assert r.headers["x-spillover-priority"] == "batch"
        r = await chat(c, headers=[("x-spillover-priority", "batch, standard")])
        assert r.headers["x-spillover-priority"] == "batch"
        r = await chat(c, headers=[("x-spillover-priority", "urgent")])
        err = error(r, 400)
        assert err["param"] == "x-spillover-priority"
        assert "interactive, standard, batch" in err["message"]
        r = await chat(c, headers=[("x-spillover-priority", "standard"),
                                   ("x-spillover-priority", "urgent")])
        error(r, 400)
        # A repeated header can never raise past the ceiling: the lowest one wins.
    async with router(World(), cfg({"max_priority": "standard"})) as (c, _):
        r = await chat(c, headers=[("x-spillover-priority", "interactive"),
                                   ("x-spillover-priority", "standard")])
        assert r.status_code == 200 and r.headers["x-spillover-priority"] == "standard"


async def test_trusted_in_process_caller_sets_the_class() -> None:
    world = World()
    async with router(world, cfg()) as (_, rt):
        principal = rt.gateway.auth.caller(AUTH)
        p = rt.gateway.plan(principal, "chat", dict(CHAT),
                            {"x-spillover-priority": "interactive"}, priority="batch")
        assert p.facts.priority == "batch"
        assert p.facts.mode == "cost-first"
        p = rt.gateway.plan(principal, "chat", dict(CHAT), {})
        assert p.facts.priority == "interactive"


# --- what the upstreams get -------------------------------------------------------------


async def test_vllm_priority_goes_to_local_engines_only() -> None:
    world = World()
    async with router(world, cfg()) as (c, _):
        # A caller's own engine priority never reaches an engine: its class decides.
        r = await chat(c, {**CHAT, "priority": -100},
                       headers=[("x-spillover-priority", "standard")])
        assert r.headers["x-spillover-route"] == "local"
        assert world.bodies("local")[-1]["priority"] == 1
        world.local_up = False
        r = await chat(c, {**CHAT, "priority": -100})
        assert r.headers["x-spillover-route"] == "hosted"
        assert r.headers["x-spillover-priority"] == "interactive"
        assert "priority" not in world.bodies("hosted")[-1]


async def test_no_priority_for_an_engine_without_priority_scheduling() -> None:
    world = World()
    config = cfg(base_url="http://127.0.0.1:8101/v1")  # reached, not started: fcfs
    async with router(world, config) as (c, _):
        r = await chat(c, {**CHAT, "priority": 3}, headers=[("x-spillover-priority", "batch")])
        assert r.headers["x-spillover-route"] == "local"
        assert "priority" not in world.bodies("local")[-1]
    world = World()
    async with router(world, cfg(base_url="http://127.0.0.1:8101/v1",
                                 scheduling_policy="priority")) as (c, _):
        await chat(c, headers=[("x-spillover-priority", "batch")])
        assert world.bodies("local")[-1]["priority"] == 2


# --- admission by class -----------------------------------------------------------------


@pytest.mark.parametrize(("kv", "local"), [
    # demo-local is started by spillover (priority scheduling): its default line is 0.9.
    (0.85, {}),  # 0.85 of max 0.9: a load of 0.94, over the line, under saturation
    # An engine at base_url schedules first-come-first-served: its default line is 0.75.
    (0.72, {"base_url": "http://127.0.0.1:8101/v1"}),  # a load of 0.8
    (0.72, {"saturation": {"max_inflight": 4, "max_waiting": 0, "batch_below": 0.75}}),
])
async def test_batch_keeps_headroom_and_interactive_still_runs_locally(
        kv: float, local: dict[str, Any]) -> None:
    world = World(kv=kv)
    async with router(world, cfg(**local)) as (c, rt):
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        err = error(r, 503)
        assert err["code"] == "batch_deferred"
        assert r.headers["retry-after"] == "5"
        assert r.headers["x-spillover-priority"] == "batch"
        assert world.bodies("hosted") == []  # never hosted at the interactive price
        r = await chat(c)
        assert r.status_code == 200
        assert r.headers["x-spillover-route"] == "local"
        assert r.headers["x-spillover-priority"] == "interactive"
        world.kv = 0.1
        await rt.monitor.refresh()  # the next scrape, without waiting for it
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"


@pytest.mark.parametrize(("local", "line"), [
    ({}, 0.9),  # started by spillover: priority scheduling
    ({"scheduling_policy": "fcfs"}, 0.75),
    ({"base_url": "http://127.0.0.1:8101/v1"}, 0.75),  # fcfs unless said otherwise
    ({"base_url": "http://127.0.0.1:8101/v1", "scheduling_policy": "priority"}, 0.9),
    ({"saturation": {"max_inflight": 4, "batch_below": 0.5}}, 0.5),  # set: it stands
    ({"scheduling_policy": "fcfs", "saturation": {"max_inflight": 4, "batch_below": 0.95}},
     0.95),
])
def test_the_default_batch_line_follows_the_engines_scheduling(local: dict[str, Any],
                                                               line: float) -> None:
    """On a priority engine the urgent classes are admitted without counting batch
    requests and served first, so its default line keeps less headroom (0.9) than a
    first-come-first-served engine's (0.75), where batch requests queue ahead of them."""
    (engine,) = [b for b in Catalog(cfg(**local)).backends("demo") or ()
                 if b.route == "local"]
    assert engine.batch_line == line


async def test_a_priority_engine_takes_batch_work_up_to_its_default_line() -> None:
    """A load of 0.8 (kv 0.72 of 0.9): under a priority engine's default line (0.9), batch
    work runs locally; the same load on a first-come-first-served engine (0.75) defers it."""
    world = World(kv=0.72)
    async with router(world, cfg()) as (c, _):
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local", r.text
    async with router(World(kv=0.72), cfg(scheduling_policy="fcfs")) as (c, _):
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        assert error(r, 503)["code"] == "batch_deferred"


async def test_batch_work_in_flight_never_makes_interactive_spill() -> None:
    """demo-local is started by spillover (priority scheduling), max_inflight 4: with four
    batch requests in flight an interactive one still runs locally (the engine serves it
    first), while a fifth batch request is deferred (batch counts every request)."""
    world = World()
    async with router(world, cfg()) as (c, rt):
        seen: list[tuple[str, bool]] = []
        acquire, release = rt.monitor.acquire, rt.monitor.release

        def counting(name: str, replica: str | None = None, *, batch: bool = False) -> None:
            seen.append((name, batch))
            acquire(name, replica, batch=batch)

        rt.monitor.acquire = counting
        r = await chat(c, headers=[("x-spillover-priority", "batch")])
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
        r = await chat(c)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
        assert seen == [("demo-local", True), ("demo-local", False)]  # the dispatcher says
        load = rt.monitor.view()["demo-local"]
        assert (load.inflight, load.batch_inflight) == (0, 0)  # and releases as it took
        for _ in range(4):  # four batch lines under way
            acquire("demo-local", batch=True)
        r = await chat(c)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
        assert world.bodies("hosted") == []
        err = error(await chat(c, headers=[("x-spillover-priority", "batch")]), 503)
        assert err["code"] == "batch_deferred"
        for _ in range(4):
            release("demo-local", batch=True)


# --- where the class shows --------------------------------------------------------------


async def test_explain_status_metrics_and_usage_show_the_class() -> None:
    world = World()
    async with router(world, cfg()) as (c, rt):
        r = await c.post("/v1/route/explain", json=CHAT,
                         headers={**AUTH, "x-spillover-priority": "batch"})
        req = r.json()["request"]
        assert (req["priority"], req["max_priority"], req["mode"]) == (
            "batch", "interactive", "cost-first")
        await chat(c, headers=[("x-spillover-priority", "batch")])
        await chat(c)
        recent = rt.recorder.recent
        assert [e["priority"] for e in list(recent)[:2]] == ["interactive", "batch"]
        text = rt.metrics.render().decode()
        assert 'priority="batch"' in text and 'priority="interactive"' in text
        assert any(line.startswith("spillover_time_to_first_token_seconds_count")
                   or line.startswith("spillover_request_latency_seconds_count")
                   for line in text.splitlines() if 'priority="batch"' in line)
        usage = rt.ledger.usage(since=0, until=time.time() + 60, group_by=["priority"])
        assert {u["priority"]: u["requests"] for u in usage} == {"batch": 1, "interactive": 1}


def test_a_ledger_from_before_classes_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE calls (id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id "
                 "TEXT NOT NULL, caller TEXT NOT NULL, alias TEXT NOT NULL, route TEXT NOT "
                 "NULL, backend TEXT NOT NULL, model_id TEXT NOT NULL, prompt_tokens INTEGER "
                 "NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, "
                 "hosted_equiv_usd REAL NOT NULL, latency_s REAL NOT NULL, ttft_s REAL, "
                 "status INTEGER NOT NULL, reason TEXT NOT NULL, endpoint TEXT NOT NULL)")
    conn.execute("INSERT INTO calls (ts, request_id, caller, alias, route, backend, model_id, "
                 "prompt_tokens, completion_tokens, cost_usd, hosted_equiv_usd, latency_s, "
                 "ttft_s, status, reason, endpoint) VALUES (1, 'r', 'app', 'demo', 'local', "
                 "'demo-local', 'demo', 1, 1, 0, 0, 0.1, NULL, 200, 'local-ok', 'chat')")
    conn.commit()
    conn.close()
    ledger = Ledger(str(path))
    try:
        (row,) = ledger.rows(since=0, until=10)
        assert row.priority == "interactive"
    finally:
        ledger.close()


# --- configuration and engine flags -----------------------------------------------------


def test_policy_default_above_its_ceiling_is_refused() -> None:
    with pytest.raises(ConfigError, match="priority 'interactive' is above max_priority"):
        cfg({"priority": "interactive", "max_priority": "batch"})
    assert cfg({"max_priority": "batch"}).callers["app"].default_priority == "batch"


def test_started_engines_run_priority_scheduling() -> None:
    config = cfg()
    alias, dep = next(iter(config.deployments()))
    assert dep.engine_scheduling == "priority"
    cmd = engine_command(deployment_spec(alias, dep), python="py")
    assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
    fcfs = cfg(scheduling_policy="fcfs")
    alias, dep = next(iter(fcfs.deployments()))
    cmd = engine_command(deployment_spec(alias, dep), python="py")
    assert cmd[cmd.index("--scheduling-policy") + 1] == "fcfs"
    reached = cfg(base_url="http://10.0.0.5:8000/v1")
    assert next(iter(reached.deployments()))[1].engine_scheduling == "fcfs"


def test_scheduling_policy_in_extra_args_is_refused() -> None:
    with pytest.raises(ConfigError, match="set scheduling_policy instead"):
        cfg(extra_args=["--scheduling-policy=fcfs"])
