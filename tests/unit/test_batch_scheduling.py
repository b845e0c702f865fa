"""The batch scheduler in the app (mock engine and hosted API, the openai SDK as the
caller): a deadline that even hosted at its concurrency cannot meet is said (a warning, and
`spillover.deadline_at_risk` in the batch object) rather than found out at expiry, and the
engine's batch concurrency follows the interactive traffic the router serves locally."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import httpx
import pytest

from tests.unit import test_batch_api
from tests.unit.helpers import BASE_YAML, World, completion
from tests.unit.test_batch_api import ALICE, VAULT, _app, _jsonl, _until


async def _state(c: Any, batch_id: str) -> dict[str, Any]:
    http = c["alice"]._client
    r = await http.get(f"http://gw/v1/batches/{batch_id}",
                       headers={"authorization": f"Bearer {ALICE}"})
    assert r.status_code == 200
    return dict(r.json())


async def test_a_deadline_hosted_cannot_meet_at_its_concurrency_is_reported(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """30 lines in 5 s; local takes 0.5 s a line one at a time, hosted 1 s a line one at a
    time (hosted_concurrency 1): about 10 + 5 lines can finish. The batch says so while it
    runs, the log warns, hosted is used from the start, and it ends expired."""
    world = World()

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return httpx.Response(200, json=completion("demo", "local answer"))

    async def slow_hosted(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return httpx.Response(200, json=completion("m", "hosted answer", usage=(10, 20)))

    world.local = slow_local  # type: ignore[assignment]
    world.hosted = slow_hosted  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger="spillover.batches")
    async with _app(tmp_path, world, local_concurrency=1, hosted_concurrency=1,
                    hosted_latency_s=1.0, provider_kind="openai") as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(30))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="5s")  # type: ignore[arg-type]
        seen: dict[str, Any] = {}
        end = time.monotonic() + 5
        while time.monotonic() < end:
            state = (await _state(c, b.id)).get("spillover")
            if state and state["deadline_at_risk"]:
                seen = state
                break
            await asyncio.sleep(0.1)
        assert seen, "the batch never said its deadline was at risk"
        assert seen["projected_shortfall"] >= 5 and seen["hosted_needed"] > 0
        assert any("projected to miss its deadline" in r.getMessage()
                   and "hosted_concurrency" in r.getMessage() for r in caplog.records)
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        assert done.status == "expired"
    assert len(world.bodies("hosted")) >= 2  # hosted ran beside local, not after it


async def test_batch_concurrency_backs_off_for_slow_interactive_requests(
        tmp_path: Any) -> None:
    """Batch lines alone: the engine's batch concurrency grows past one line. A single
    interactive request served locally at 0.8 s (0.8 of interactive_ttft_slo_ms) does not
    cut it; a stream of them, ten a second (the p90 of the window at 0.8 s), cuts it to
    one."""
    world = World()

    async def local(req: httpx.Request) -> httpx.Response:
        body = req.content.decode()
        await asyncio.sleep(0.8 if "interactive" in body else 0.1)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = local  # type: ignore[assignment]
    async with _app(tmp_path, world, provider_kind="openai",
                    interactive_ttft_slo_ms=1000) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(400))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
        grown = 0
        end = time.monotonic() + 8
        while time.monotonic() < end and grown < 2:
            state = (await _state(c, b.id)).get("spillover") or {}
            grown = max(grown, int(state.get("local_concurrency_allowed") or 0))
            await asyncio.sleep(0.1)
        assert grown >= 2

        async def interactive() -> None:
            await c["alice"].chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "interactive"}])

        before = (await _state(c, b.id))["spillover"]["local_concurrency_allowed"]
        await interactive()  # one slow request: seen, no cut
        await asyncio.sleep(0.6)
        after = (await _state(c, b.id))["spillover"]["local_concurrency_allowed"]
        assert after >= before >= 2, (before, after)
        sent = []
        for _ in range(35):
            sent.append(asyncio.create_task(interactive()))
            await asyncio.sleep(0.1)
        allowed = []
        for _ in range(8):
            sent.append(asyncio.create_task(interactive()))
            await asyncio.sleep(0.1)
            allowed.append((await _state(c, b.id))["spillover"]["local_concurrency_allowed"])
        await asyncio.gather(*sent)
        assert max(allowed) == 1, allowed
        await c["alice"].batches.cancel(b.id)
        await _until(c["alice"], b.id, {"cancelled"})


async def test_a_deadline_at_risk_raises_the_batch_concurrency_floor(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An on-prem caller's batch (it may not go hosted): 80 lines in 12 s, local lines of
    0.5 s, and a stream of interactive requests at 0.8 s, five a second (hot: alone they
    cut the batch to one line, see above). One line at a time the batch would finish about
    24: it is projected to miss its deadline, so the floor rises under the batch
    concurrency and the engine runs several batch lines at once although interactive TTFTs
    are hot. (The engine takes 12 at once here, so batch_below leaves the batch room.)"""
    monkeypatch.setattr(test_batch_api, "BASE_YAML",
                        BASE_YAML.replace("max_inflight: 4", "max_inflight: 12"))
    world = World()

    async def local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.8 if "interactive" in req.content.decode() else 0.5)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = local  # type: ignore[assignment]
    async with _app(tmp_path, world, provider_kind="openai",
                    interactive_ttft_slo_ms=1000) as c:
        vault = c["vault"]
        f = await vault.files.create(file=("in.jsonl", io.BytesIO(_jsonl(80))),
                                     purpose="batch")
        b = await vault.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="12s")  # type: ignore[arg-type]

        async def interactive() -> None:
            await vault.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "interactive"}])

        sent: list[asyncio.Task[None]] = []
        states: list[dict[str, Any]] = []
        http = vault._client
        for i in range(40):  # 8 s of interactive requests, five a second
            sent.append(asyncio.create_task(interactive()))
            await asyncio.sleep(0.2)
            if i >= 15:  # the stream hot for 2 s and more
                r = await http.get(f"http://gw/v1/batches/{b.id}",
                                   headers={"authorization": f"Bearer {VAULT}"})
                states.append(r.json().get("spillover") or {})
        await asyncio.gather(*sent)
        raised = [s for s in states if s.get("deadline_at_risk")
                  and (s.get("local_concurrency_floor") or 0) >= 3]
        assert raised, states
        assert max(s["local_concurrency_allowed"] for s in raised) >= 3, raised
        assert max(s["local_in_flight"] for s in states) >= 3, states
        await vault.batches.cancel(b.id)
        await _until(vault, b.id, {"cancelled", "expired"})


def test_batch_concurrency_ceiling_is_the_engines_batch_line_unless_capped() -> None:
    """Unset, batches.local_concurrency lets batch work fill each engine up to its batch
    line in requests (a fixed 16 left most of a large engine's line unused); set, it caps."""
    from router.config import Batches
    from router.routing.batch_scheduler import BatchScheduler
    from router.routing.catalog import Catalog
    from tests.unit.helpers import config

    def engine(max_inflight: int, batch_below: float) -> Any:
        yaml_text = BASE_YAML.replace(
            "saturation: {max_waiting: 0, max_inflight: 4, resume_below: 0.5}",
            f"saturation: {{max_waiting: 0, max_inflight: {max_inflight}, "
            f"batch_below: {batch_below}, resume_below: 0.5}}")
        (local,) = [b for b in Catalog(config(yaml_text)).backends("demo") or ()
                    if b.route == "local"]
        return local

    ceiling = BatchScheduler._ceiling
    assert Batches().local_concurrency is None
    assert ceiling(Batches(), engine(36, 0.75)) == 27  # batch admitted while < 27 in flight
    assert ceiling(Batches(), engine(6, 0.75)) == 5  # 4.5: the 5th goes in at 4
    assert ceiling(Batches(), engine(4, 0.1)) == 1  # never below one line
    assert ceiling(Batches(local_concurrency=3), engine(36, 0.75)) == 3
