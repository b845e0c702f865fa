"""POST /admin/reload and Runtime.reload: what a reload may change, what it keeps, and
overlapping reloads (upstreams faked with MockTransport)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.app import Settings, create_app
from router.runtime import Runtime
from tests.unit.helpers import (
    BRAIN_ENV,
    CHAT,
    World,
    assert_openai_error,
    auth,
    brain_config,
    config,
    lifespan_client,
)

MONITOR_TASK = "spillover-load-monitor"


class Probes:
    """The world's transport with engine probes that take a while, so that overlapping
    reloads really interleave; counts /metrics scrapes."""

    def __init__(self, world: World, delay_s: float = 0.02) -> None:
        self.world, self.delay_s, self.scrapes = world, delay_s, 0
        self._random = random.Random(11)  # probes answer in varying order, reproducibly

    async def handle(self, req: httpx.Request) -> httpx.Response:
        if req.url.path in ("/health", "/metrics"):
            if req.url.path == "/metrics":
                self.scrapes += 1
            await asyncio.sleep(self.delay_s * self._random.random())
        return self.world._handle(req)


def monitor_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == MONITOR_TASK and not t.done()]


@contextlib.asynccontextmanager
async def served(tmp_path: Path, data: dict[str, Any], transport: httpx.AsyncBaseTransport,
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime, Path]]:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    app = create_app(Settings(config_path=str(path), env=BRAIN_ENV),
                     config=config(yaml.safe_dump(data)), transport=transport)
    async with lifespan_client(app) as c:
        yield c, app.state.runtime, path


@pytest.mark.parametrize("drop", ["callers", "admin_key_sha256", "both"])
async def test_reload_that_opens_the_gateway_needs_allow_open(tmp_path: Path,
                                                              drop: str) -> None:
    """A file whose callers: section was cut off answered 200 and turned authentication
    off; without admin_key_sha256 it opened /status and /admin/reload too."""
    world = World()
    async with served(tmp_path, brain_config(), world.transport()) as (c, rt, path):
        cut = brain_config()
        for key in (("callers", "admin_key_sha256") if drop == "both" else (drop,)):
            del cut[key]
        path.write_text(yaml.safe_dump(cut))
        r = await c.post("/admin/reload", headers=auth("admin"))
        err = assert_openai_error(r, 400)
        assert err["code"] == "reload_opens_gateway" and err["param"] == "allow_open"
        # Nothing changed: still closed, the admin key still administers.
        assert_openai_error(await c.post("/v1/chat/completions", json=CHAT), 401)
        assert_openai_error(await c.get("/status"), 401)
        assert (await c.get("/status", headers=auth("admin"))).status_code == 200
        assert rt.config.callers and rt.config.admin_key_sha256
        # The operator says so explicitly: then it is done.
        r = await c.post("/admin/reload?allow_open=true", headers=auth("admin"))
        assert r.status_code == 200, r.text
        if drop != "admin_key_sha256":
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        if drop == "admin_key_sha256":
            assert_openai_error(await c.get("/status", headers=auth("admin")), 403)


async def test_reload_keeping_callers_and_admin_needs_no_flag(tmp_path: Path) -> None:
    world = World()
    async with served(tmp_path, brain_config(), world.transport()) as (c, _rt, path):
        data = brain_config()
        del data["callers"]["lab"]
        path.write_text(yaml.safe_dump(data))
        r = await c.post("/admin/reload", headers=auth("admin"))
        assert r.status_code == 200 and "lab" not in r.json()["callers"]
        assert_openai_error(await c.post("/v1/chat/completions", json=CHAT,
                                         headers=auth("lab")), 401)


async def test_runtime_reload_refuses_opening_unless_allowed(tmp_path: Path) -> None:
    """The path SIGHUP takes (spillover serve --allow-open-reload sets the flag)."""
    world = World()
    async with served(tmp_path, brain_config(), world.transport()) as (_, rt, path):
        path.write_text(yaml.safe_dump({k: v for k, v in brain_config().items()
                                        if k != "callers"}))
        with pytest.raises(Exception, match="would open the gateway") as info:
            await rt.reload()
        assert getattr(info.value, "code", None) == "reload_opens_gateway"
        assert not rt.auth.open
        await rt.reload(allow_open=True)
        assert rt.auth.open


async def test_rate_limits_keep_their_state_across_a_reload(tmp_path: Path) -> None:
    """Every reload refilled every caller's buckets: 201 requests passed in 5.7 s where the
    limit allows 66."""
    world = World()
    data = brain_config()
    data["callers"]["alice"]["rate_limit"] = {"requests_per_minute": 2}
    async with served(tmp_path, data, world.transport()) as (c, _, _path):
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
            assert r.status_code == 200
        for _ in range(3):
            assert (await c.post("/admin/reload", headers=auth("admin"))).status_code == 200
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
            assert_openai_error(r, 429)
        assert (await c.post("/v1/chat/completions", json=CHAT,
                             headers=auth("bob"))).status_code == 200


async def test_overlapping_reloads_leave_one_monitor(tmp_path: Path) -> None:
    """20 concurrent reloads left load monitors running twice: scrapes of the engines'
    /metrics went from 2 to 34 a second and never came down."""
    world = World()
    probes = Probes(world)
    data = brain_config(server={"request_timeout_s": 5, "metrics_interval_s": 0.05,
                                "ledger_path": ":memory:"})
    async with served(tmp_path, data, httpx.MockTransport(probes.handle)) as (c, rt, _):
        assert len(monitor_tasks()) == 1
        rs = await asyncio.gather(*(c.post("/admin/reload", headers=auth("admin"))
                                    for _ in range(20)))
        assert [r.status_code for r in rs] == [200] * 20
        tasks = monitor_tasks()
        assert len(tasks) == 1, f"{len(tasks)} load monitors running"
        assert rt.monitor._task is tasks[0]
        # And the scrape rate is one monitor's: two engines (demo-local, large-local) every
        # 0.05 s plus the probe's own 0.02 s, about 28 a second; 20 monitors would be ~560.
        before = probes.scrapes
        await asyncio.sleep(0.5)
        assert probes.scrapes - before <= 30
    assert monitor_tasks() == []


async def test_cancelled_reloads_finish_or_leave_nothing(tmp_path: Path) -> None:
    """SIGHUPs arrive as tasks; one cancelled mid-way (shutdown, a caller gone) must not
    leave the monitor it started behind."""
    world = World()
    probes = Probes(world, delay_s=0.05)
    async with served(tmp_path, brain_config(), httpx.MockTransport(probes.handle)) as (
            _, rt, _path):
        reloads = [asyncio.ensure_future(rt.reload()) for _ in range(10)]
        await asyncio.sleep(0.07)
        for t in reloads[::2]:
            t.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        # Cancelled reloads run to their end in the background: one more reload comes
        # after all of them.
        await rt.reload()
        tasks = monitor_tasks()
        assert len(tasks) == 1 and rt.monitor._task is tasks[0]
    assert monitor_tasks() == []
