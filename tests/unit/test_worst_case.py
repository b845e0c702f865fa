"""A request's worst case is one real bound, used everywhere: the budget hold, the
per-request limits and the tokens-per-minute charge. `n` multiplies it, a request without
max_tokens is sent the default one, and one request cannot hold the shared budget hostage.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from router.accounting.budgets import MemoryBudgetBook
from router.config import Budget, GlobalBudget
from tests.unit.helpers import (
    CHAT,
    World,
    assert_openai_error,
    auth,
    brain_config,
    completion,
    router,
    router_app,
)


@pytest.fixture
def world() -> World:
    return World(local_up=False)  # every request goes hosted unless refused


async def test_n_multiplies_the_worst_case_against_max_request_usd(world: World) -> None:
    data = brain_config()
    data["callers"]["alice"]["max_request_usd"] = 0.01
    data["callers"]["alice"]["budget"] = {"daily_usd": 0.05}
    async with router(world, data) as c:
        one = {**CHAT, "max_tokens": 900}
        r = await c.post("/v1/chat/completions", json=one, headers=auth("alice"))
        assert r.status_code == 200, r.text
        # 100 answers of 900 tokens at $0.3/M: $0.027, over the $0.01 per-request limit.
        many = {**one, "n": 100}
        r = await c.post("/v1/chat/completions", json=many, headers=auth("alice"))
        assert assert_openai_error(r, 503)["code"] == "cost_limit"
        # best_of generates (and bills) every candidate as well.
        r = await c.post("/v1/chat/completions", json={**one, "best_of": 100},
                         headers=auth("alice"))
        assert assert_openai_error(r, 503)["code"] == "cost_limit"
    assert len(world.bodies("hosted")) == 1  # the refused ones reached nobody


async def test_n_multiplies_the_hold_and_explain_prices_it(world: World) -> None:
    async with router_app(world, brain_config()) as (c, rt):
        prices = []
        for n in (1, 10):
            body = {**CHAT, "max_tokens": 1000, "n": n}
            ex = (await c.post("/v1/route/explain", json=body, headers=auth("alice"))).json()
            assert ex["request"]["output_tokens_max"] == 1000 * n
            prices.append({x["backend"]: x.get("worst_case_usd")
                           for x in ex["candidates"]}["mistral:mistral-small-latest"])
        assert prices[1] > 9 * prices[0]
        held: list[float] = []
        real = rt.budgets.reserve

        async def spy(caller: str, amount: float) -> Any:
            held.append(amount)
            return await real(caller, amount)

        rt.budgets.reserve = spy  # type: ignore[method-assign]
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000, "n": 10},
                         headers=auth("alice"))
        assert r.status_code == 200, r.text
        assert held == [pytest.approx(prices[1], rel=1e-3)]  # explain rounds


async def test_a_hosted_call_without_max_tokens_is_sent_the_default(world: World) -> None:
    data = brain_config()
    data["routing"]["default_max_tokens"] = 321
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth("alice"))
        assert r.status_code == 200, r.text
        ex = (await c.post("/v1/route/explain", json=CHAT, headers=auth("alice"))).json()
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 7},
                         headers=auth("alice"))
        assert r.status_code == 200, r.text
    sent = [b.get("max_tokens") for b in world.bodies("hosted")]
    assert sent == [321, 7]  # the caller's own max_tokens is left as it is
    assert ex["request"]["output_tokens_max"] == 321


async def test_a_request_over_the_per_request_ceiling_is_refused_before_any_hold(
        world: World) -> None:
    data = brain_config(budget={"daily_usd": 5.0, "max_request_usd": 0.001})
    async with router_app(world, data) as (c, rt):
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100},
                         headers=auth("alice"))
        assert r.status_code == 200, r.text
        # $0.03 of output: would hold most of nothing, but the ceiling says no.
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000},
                         headers=auth("alice"))
        assert assert_openai_error(r, 400)["code"] == "cost_limit"
        snap: Any = rt.budgets.snapshot()
        assert snap["global"]["daily"]["reserved"] == 0.0
    assert len(world.bodies("hosted")) == 1


async def test_one_caller_cannot_hold_the_whole_global_budget(world: World) -> None:
    data = brain_config(budget={"daily_usd": 0.01, "max_caller_share": 0.5})
    async with router_app(world, data) as (c, rt):
        # Sized to the whole global allowance: more than alice's half of it.
        body = {**CHAT, "max_tokens": 20_000}  # $0.006 on mistral
        r = await c.post("/v1/chat/completions", json=body, headers=auth("alice"))
        assert assert_openai_error(r, 429)["code"] == "budget_exceeded"
        # bob still has his own half.
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000},
                         headers=auth("bob"))
        assert r.status_code == 200, r.text
        assert rt.budgets.allowance("alice") == pytest.approx(0.005)
        # explain shows alice her own share, never what is left of everyone's budget.
        ex = (await c.post("/v1/route/explain", json=CHAT, headers=auth("alice"))).json()
        assert "hosted_allowance_usd" not in ex["request"]
        assert ex["request"]["caller_allowance_usd"] == pytest.approx(0.005)
        details = " ".join(f["detail"] for f in ex["filtered"])
        assert "0.00" not in details.replace("$0.00", "")


async def test_the_share_caps_every_caller_in_the_book() -> None:
    book = MemoryBudgetBook(GlobalBudget(daily_usd=1.0, max_caller_share=0.25),
                            {"app": Budget(daily_usd=0.5), "tiny": Budget(daily_usd=0.1)})
    assert book.allowance("app") == pytest.approx(0.25)
    assert book.allowance("tiny") == pytest.approx(0.1)
    assert book.allowance("stranger") == pytest.approx(0.25)
    assert await book.reserve("stranger", 0.3) is None
    assert await book.reserve("stranger", 0.2) is not None
    assert await book.reserve("stranger", 0.1) is None
    assert book.caller_allowance("stranger") == pytest.approx(0.05)
    assert await book.reserve("app", 0.25) is not None
    # Global has 0.55 left; a caller sees only its own.
    assert book.caller_allowance("app") == 0.0
    assert MemoryBudgetBook(GlobalBudget(daily_usd=1.0), {}).caller_allowance("app") is None


def overlapping(world: World) -> None:
    """Hosted answers that take a while (so requests are in flight together) and use
    little (so the true-up after each gives most of its charge back)."""
    world.hosted = lambda req: httpx.Response(200, json=completion("m", usage=(10, 10)))
    sync = world._handle

    async def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/chat/completions"):
            await asyncio.sleep(0.2)
        return sync(req)

    world.transport = lambda: httpx.MockTransport(handler)  # type: ignore[method-assign]


async def test_tokens_per_minute_charge_the_bounded_worst_case(world: World) -> None:
    overlapping(world)
    data = brain_config()
    data["routing"]["default_max_tokens"] = 200
    data["callers"]["alice"]["rate_limit"] = {"tokens_per_minute": 1000}
    async with router(world, data) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT,
                                           headers=auth("alice")) for _ in range(10)))
    ok = [r for r in rs if r.status_code == 200]
    # Each is charged ~30 prompt tokens at most + 200 output up front: four fit a minute.
    assert len(ok) == 4
    assert {r.status_code for r in rs if r not in ok} == {429}


@pytest.mark.parametrize("extra", [{"max_tokens": 1_000_000}, {"max_tokens": 400, "n": 3},
                                   {}])
async def test_a_request_larger_than_a_minute_is_refused_not_admitted(
        world: World, extra: dict[str, Any]) -> None:
    data = brain_config()
    data["callers"]["alice"]["rate_limit"] = {"tokens_per_minute": 1000}
    async with router(world, data) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, **extra},
                         headers=auth("alice"))
        err = assert_openai_error(r, 400)
        assert err["code"] == "tokens_per_minute_exceeded"
        assert "1000 tokens a minute" in str(err["message"])
        # Nothing was charged: a request that fits still passes at once.
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 900},
                         headers=auth("alice"))
        assert r.status_code == 200, r.text
    assert len(world.bodies("hosted")) == 1
