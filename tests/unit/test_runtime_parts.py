"""Runtime.parts: every config-derived part in one frozen object, swapped whole by a
reload, so a request that awaits mid-way never mixes two configs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.unit.helpers import World
from tests.unit.test_brain import auth, brain_config
from tests.unit.test_reload import served


async def test_reload_swaps_all_parts_in_one_frozen_object(tmp_path: Path) -> None:
    world = World()
    async with served(tmp_path, brain_config(), world.transport()) as (_, rt, path):
        before = rt.parts
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.config = before.config  # type: ignore[misc]
        data = brain_config()
        del data["aliases"]["research"]
        path.write_text(yaml.safe_dump(data))
        await rt.reload()
        after = rt.parts
        assert after is not before
        # The old object is untouched: a request holding it still sees its own config.
        assert "research" in before.config.aliases and "research" in before.catalog.aliases
        assert "research" not in after.config.aliases
        assert "research" not in after.catalog.aliases
        # The shorthands read the current parts.
        assert rt.config is after.config and rt.gateway is after.gateway
        assert rt.auth is after.auth and rt.catalog is after.catalog


async def test_a_request_awaiting_across_a_reload_keeps_the_parts_it_started_with(
        tmp_path: Path) -> None:
    """The explain route authenticated with one config, awaited the body, then planned
    with the next one: an alias the reload removed answered 404 to a request that was
    admitted while it existed."""
    world = World()
    async with served(tmp_path, brain_config(), world.transport()) as (c, rt, path):
        reloaded = asyncio.Event()
        body_wanted = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            body_wanted.set()
            await asyncio.wait_for(reloaded.wait(), 5.0)
            yield json.dumps({"model": "research",
                              "messages": [{"role": "user", "content": "hi"}]}).encode()

        request = asyncio.ensure_future(c.post(
            "/v1/route/explain", content=slow_body(),
            headers={**auth("lab"), "content-type": "application/json"}))
        await asyncio.wait_for(body_wanted.wait(), 5.0)
        data = brain_config()
        del data["aliases"]["research"]
        path.write_text(yaml.safe_dump(data))
        await rt.reload()
        reloaded.set()
        r = await asyncio.wait_for(request, 5.0)
        assert r.status_code == 200, r.text
        assert r.json()["request"]["alias"] == "research"
        assert r.json()["plan"]["targets"] == ["large-local"]
        # A request that starts now sees the new config.
        r = await c.post("/v1/route/explain", headers=auth("lab"),
                         json={"model": "research",
                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404, r.text
