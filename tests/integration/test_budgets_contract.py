"""One contract, two implementations of `Budgets`: the book in this process and the book
in PostgreSQL must answer every question the same way. Each test runs once per book.

The PostgreSQL book's `allowance` and `snapshot` read a view (a planning hint); `settled`
is the point where a test lets it catch up (the ledger writer's commit, a refresh), so the
answers compared are the ones the book converges to, not a race with its writer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from router.accounting.budgets import Budgets, MemoryBudgetBook, Reservation
from router.accounting.budgets_pg import PgBudgetBook
from router.accounting.ledger_pg import PgLedger
from router.accounting.pg import PgTarget
from router.app import Settings, create_app
from router.config import Budget, GlobalBudget, parse_config
from tests.unit.helpers import World
from tests.unit.test_brain import auth, brain_config
from tests.unit.test_gateway import CHAT, assert_openai_error

NOON = 1710072000.0  # 2024-03-10 12:00 UTC
DAY = 86400.0


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Book:
    budgets: Budgets
    settled: Callable[[], Awaitable[None]]  # let a view catch up with what was done


Make = Callable[..., Awaitable[Book]]


@pytest.fixture(params=["memory", "postgresql"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    async with contextlib.AsyncExitStack() as stack:
        url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None

        async def build(global_budget: Budget, callers: Mapping[str, Budget],
                        clock: Clock | None = None) -> Book:
            clock = clock or Clock()
            if url is None:
                async def nothing() -> None:
                    return None
                return Book(MemoryBudgetBook(global_budget, callers, clock), nothing)
            ledger = PgLedger(PgTarget.from_url(url, "TEST_DATABASE_URL"))
            await stack.enter_async_context(ledger)
            book = PgBudgetBook(global_budget, callers, ledger, hold_ttl_s=300.0, clock=clock)
            book.load(ledger)

            async def settled() -> None:
                await ledger.flush()
                await book.refresh()
            return Book(book, settled)

        yield build


def held(r: Reservation | None) -> Reservation:
    assert r is not None
    return r


async def test_reserve_settle_release_allowance_snapshot(make: Make) -> None:
    book = await make(Budget(daily_usd=1.0), {"app": Budget(daily_usd=0.5)})
    b = book.budgets
    assert b.allowance("app") == pytest.approx(0.5)
    assert b.allowance("other") == pytest.approx(1.0)  # only the global budget applies
    assert b.caller_allowance("other") is None
    assert b.caller_allowance("app") == pytest.approx(0.5)

    first = held(await b.reserve("app", 0.4))
    assert b.allowance("app") == pytest.approx(0.1)
    assert await b.reserve("app", 0.2) is None  # the caller's 0.5
    big = held(await b.reserve("other", 0.6))  # the global 1.0
    assert await b.reserve("other", 0.1) is None
    with pytest.raises(ValueError):
        await b.reserve("app", -0.1)

    b.release(first)
    b.release(first)  # a no-op, so a finally: may release unconditionally
    await book.settled()
    assert b.allowance("app") == pytest.approx(0.4)  # the global budget now binds

    b.settle(big, 0.7)  # cost more than estimated: the spend is the actual
    with pytest.raises(ValueError):
        b.settle(big, 0.7)  # settling twice would count it twice
    with pytest.raises(ValueError):
        b.settle(held(await b.reserve("app", 0.0)), -1.0)
    await book.settled()
    assert b.allowance("app") == pytest.approx(0.3)
    assert b.caller_allowance("app") == pytest.approx(0.5)  # its own limit, not the global

    snap: Any = b.snapshot()
    assert snap["global"] == {
        "daily": {"limit": 1.0, "spent": pytest.approx(0.7), "reserved": pytest.approx(0.0),
                  "left": pytest.approx(0.3)},
        "monthly": {"limit": None, "spent": pytest.approx(0.7),
                    "reserved": pytest.approx(0.0), "left": None}}
    assert sorted(snap["callers"]) == ["app", "other"]  # configured, and one that spent
    assert snap["callers"]["app"]["daily"] == {"limit": 0.5, "spent": 0.0,
                                               "reserved": pytest.approx(0.0),
                                               "left": pytest.approx(0.5)}
    assert snap["callers"]["other"]["daily"]["limit"] is None
    assert snap["callers"]["other"]["daily"]["spent"] == pytest.approx(0.7)


async def test_float_sums_fit_exactly_and_no_budget_admits_everything(make: Make) -> None:
    b = (await make(Budget(daily_usd=0.3), {})).budgets
    for _ in range(3):
        assert await b.reserve("app", 0.1) is not None
    assert await b.reserve("app", 1e-6) is None

    free = await make(Budget(), {})
    assert free.budgets.allowance("app") is None
    r = held(await free.budgets.reserve("app", 1e6))
    free.budgets.settle(r, 2.0)
    await free.settled()
    snap: Any = free.budgets.snapshot()
    assert snap["global"]["daily"]["spent"] == pytest.approx(2.0)  # counted all the same


async def test_the_caller_share_caps_every_caller(make: Make) -> None:
    b = (await make(GlobalBudget(daily_usd=1.0, max_caller_share=0.25),
                    {"app": Budget(daily_usd=0.5), "tiny": Budget(daily_usd=0.1)})).budgets
    assert b.allowance("app") == pytest.approx(0.25)
    assert b.allowance("tiny") == pytest.approx(0.1)
    assert b.allowance("stranger") == pytest.approx(0.25)
    assert await b.reserve("stranger", 0.3) is None
    assert await b.reserve("stranger", 0.2) is not None
    assert await b.reserve("stranger", 0.1) is None
    assert b.caller_allowance("stranger") == pytest.approx(0.05)
    assert await b.reserve("app", 0.25) is not None
    assert b.caller_allowance("app") == 0.0  # global has 0.55 left; a caller sees its own
    snap: Any = b.snapshot()
    assert snap["callers"]["app"]["daily"]["limit"] == pytest.approx(0.25)  # the cap shows


async def test_reconfigure_keeps_spend_and_reservations_in_flight(make: Make) -> None:
    book = await make(Budget(daily_usd=1.0),
                      {"app": Budget(daily_usd=0.5), "gone": Budget(daily_usd=0.2)})
    b = book.budgets
    flying = held(await b.reserve("app", 0.3))
    b.settle(held(await b.reserve("gone", 0.1)), 0.1)
    await book.settled()
    # models.yaml reloaded: tighter global budget, app's limit raised, "gone" removed.
    b.reconfigure(Budget(daily_usd=0.8), {"app": Budget(daily_usd=2.0)})
    assert b.allowance("app") == pytest.approx(0.8 - 0.1 - 0.3)  # global now binds
    b.settle(flying, 0.25)  # a call that spanned the reload is still counted
    await book.settled()
    assert b.allowance("app") == pytest.approx(0.8 - 0.1 - 0.25)
    snap: Any = b.snapshot()
    assert snap["callers"]["gone"]["daily"]["limit"] is None
    assert snap["callers"]["gone"]["daily"]["spent"] == pytest.approx(0.1)


async def test_a_new_day_keeps_the_month(make: Make) -> None:
    clock = Clock(NOON)
    book = await make(Budget(daily_usd=1.0, monthly_usd=1.5), {}, clock)
    b = book.budgets
    b.settle(held(await b.reserve("app", 0.9)), 0.9)
    await book.settled()
    assert b.allowance("app") == pytest.approx(0.1)
    clock.now += DAY
    await book.settled()
    assert b.allowance("app") == pytest.approx(0.6)  # daily fresh, monthly still counts
    assert await b.reserve("app", 0.7) is None
    assert await b.reserve("app", 0.6) is not None


# -- the per-request ceiling and the caller share, through the router, on either store ----


@contextlib.asynccontextmanager
async def router_on(store: str, request: pytest.FixtureRequest, world: World,
                    data: dict[str, Any]) -> AsyncIterator[Any]:
    env = {"MISTRAL_API_KEY": "sk-test-secret", "BACKUP_KEY": "sk-backup-secret"}
    if store == "postgresql":
        data["server"]["database_url_env"] = "SPILLOVER_DB"
        env["SPILLOVER_DB"] = request.getfixturevalue("pg_url")
    app = create_app(Settings(env=env), config=parse_config(yaml.safe_dump(data)),
                     transport=world.transport())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c


STORES = pytest.mark.parametrize("store", ["memory", "postgresql"])


@STORES
async def test_the_per_request_ceiling_refuses_before_any_hold(
        store: str, request: pytest.FixtureRequest) -> None:
    world = World(local_up=False)
    data = brain_config(budget={"daily_usd": 5.0, "max_request_usd": 0.001})
    async with router_on(store, request, world, data) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100},
                         headers=auth("alice"))
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000},
                         headers=auth("alice"))
        assert assert_openai_error(r, 400)["code"] == "cost_limit"
    assert len(world.bodies("hosted")) == 1


@STORES
async def test_one_caller_cannot_hold_the_whole_global_budget(
        store: str, request: pytest.FixtureRequest) -> None:
    world = World(local_up=False)
    data = brain_config(budget={"daily_usd": 0.01, "max_caller_share": 0.5})
    async with router_on(store, request, world, data) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20_000},
                         headers=auth("alice"))  # $0.006 on mistral: over alice's half
        assert assert_openai_error(r, 429)["code"] == "budget_exceeded"
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000},
                         headers=auth("bob"))
        assert r.status_code == 200, r.text
    assert len(world.bodies("hosted")) == 1
