from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from router.accounting.budgets import (
    MemoryBudgetBook,
    Reservation,
    day_start,
    local_cost_per_mtok,
    month_start,
)
from router.accounting.ledger import MEMORY, Ledger, LedgerRow
from router.accounting.storage import budget_book
from router.config import Budget
from tests.unit.helpers import Clock, config


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def book(
    daily: float | None = None,
    monthly: float | None = None,
    callers: dict[str, Budget] | None = None,
    clock: Clock | None = None,
) -> MemoryBudgetBook:
    return MemoryBudgetBook(
        Budget(daily_usd=daily, monthly_usd=monthly),
        callers or {},
        clock or Clock(at("2024-03-10T12:00:00")),
    )


def held(r: Reservation | None) -> Reservation:
    assert r is not None
    return r


@pytest.mark.parametrize(
    ("gpu_hour", "tps", "expected"),
    [
        (3.6, 1000.0, 1.0),  # 3.6 USD / 3.6M tokens an hour
        (2.0, 500.0, 2.0 / (500 * 3600) * 1e6),
        (2.0, None, None),
        (2.0, 0.0, None),
        (2.0, -5.0, None),
        (0.0, 1000.0, 0.0),
        (0.0, None, 0.0),  # a free GPU is free whatever its throughput
    ],
)
def test_local_cost_per_mtok(gpu_hour: float, tps: float | None, expected: float | None) -> None:
    assert local_cost_per_mtok(gpu_hour, tps) == pytest.approx(expected)


def test_local_cost_rejects_a_negative_price() -> None:
    with pytest.raises(ValueError):
        local_cost_per_mtok(-1.0, 100.0)


def test_window_starts() -> None:
    assert day_start(at("2024-03-10T23:59:59.5")) == at("2024-03-10T00:00:00")
    assert day_start(at("2024-03-11T00:00:00")) == at("2024-03-11T00:00:00")
    assert month_start(at("2024-03-31T23:59:59")) == at("2024-03-01T00:00:00")
    assert month_start(at("2024-01-01T00:00:00")) == at("2024-01-01T00:00:00")


async def test_no_budget_means_no_allowance_and_reserve_always_succeeds() -> None:
    b = book()
    assert b.allowance("app") is None
    r = held(await b.reserve("app", 1e6))
    b.settle(r, 1e6)
    assert b.allowance("app") is None


async def test_allowance_is_the_least_left_across_windows() -> None:
    b = book(daily=10.0, monthly=100.0, callers={"app": Budget(daily_usd=3.0, monthly_usd=50)})
    assert b.allowance("app") == pytest.approx(3.0)
    assert b.allowance("other") == pytest.approx(10.0)  # only the global budget applies
    b.settle(held(await b.reserve("other", 0.0)), 8.0)
    assert b.allowance("app") == pytest.approx(2.0)  # global daily now the tightest
    b.settle(held(await b.reserve("app", 2.0)), 2.0)
    assert b.allowance("app") == 0.0
    assert b.allowance("other") == 0.0


async def test_reserve_refuses_over_allowance_and_counts_reservations() -> None:
    b = book(daily=1.0)
    first = held(await b.reserve("app", 0.6))
    assert b.allowance("app") == pytest.approx(0.4)
    assert await b.reserve("app", 0.5) is None
    assert b.allowance("app") == pytest.approx(0.4)  # a refusal books nothing
    assert first.amount_usd == 0.6 and first.caller == "app"
    with pytest.raises(ValueError):
        await b.reserve("app", -0.1)


async def test_float_sums_do_not_refuse_an_exact_fit() -> None:
    b = book(daily=0.3)
    for _ in range(3):
        assert await b.reserve("app", 0.1) is not None
    assert await b.reserve("app", 1e-6) is None


async def test_settle_with_less_or_more_than_reserved() -> None:
    b = book(daily=1.0)
    b.settle(held(await b.reserve("app", 0.5)), 0.2)
    assert b.allowance("app") == pytest.approx(0.8)
    b.settle(held(await b.reserve("app", 0.1)), 0.5)  # cost more than estimated: spend is higher
    assert b.allowance("app") == pytest.approx(0.3)
    b.settle(held(await b.reserve("app", 0.3)), 0.9)
    assert b.allowance("app") == 0.0  # never negative
    daily = b.snapshot()["global"]["daily"]  # type: ignore[index]
    assert daily == {"limit": 1.0, "spent": pytest.approx(1.6), "reserved": 0.0, "left": 0.0}


async def test_settling_twice_is_an_error() -> None:
    b = book(daily=1.0)
    r = held(await b.reserve("app", 0.1))
    b.settle(r, 0.1)
    with pytest.raises(ValueError):
        b.settle(r, 0.1)
    b.release(r)  # a no-op, so a finally: may release unconditionally
    assert b.allowance("app") == pytest.approx(0.9)


async def test_release_gives_the_reservation_back() -> None:
    b = book(daily=1.0)
    r = held(await b.reserve("app", 0.7))
    assert b.allowance("app") == pytest.approx(0.3)
    b.release(r)
    assert b.allowance("app") == pytest.approx(1.0)
    b.release(r)
    assert b.allowance("app") == pytest.approx(1.0)


async def test_day_rollover_keeps_the_month() -> None:
    clock = Clock(at("2024-03-10T23:59:00"))
    b = book(daily=1.0, monthly=1.5, clock=clock)
    b.settle(held(await b.reserve("app", 0.9)), 0.9)
    assert b.allowance("app") == pytest.approx(0.1)
    clock.now = at("2024-03-11T00:00:01")
    assert b.allowance("app") == pytest.approx(0.6)  # daily fresh, monthly still counts
    snap = b.snapshot()
    assert snap["global"] == {
        "daily": {"limit": 1.0, "spent": 0.0, "reserved": 0.0, "left": 1.0},
        "monthly": {"limit": 1.5, "spent": pytest.approx(0.9), "reserved": 0.0,
                    "left": pytest.approx(0.6)},
    }


async def test_month_rollover() -> None:
    clock = Clock(at("2024-02-29T18:00:00"))
    b = book(monthly=1.0, callers={"app": Budget(daily_usd=5.0)}, clock=clock)
    b.settle(held(await b.reserve("app", 1.0)), 1.0)
    assert await b.reserve("app", 0.01) is None
    clock.now = at("2024-03-01T00:00:00")
    assert b.allowance("app") == pytest.approx(1.0)


async def test_a_reservation_settled_after_midnight_counts_on_the_new_day() -> None:
    clock = Clock(at("2024-03-10T23:59:59"))
    b = book(daily=1.0, clock=clock)
    r = held(await b.reserve("app", 0.4))
    clock.now = at("2024-03-11T00:00:30")
    assert b.allowance("app") == pytest.approx(0.6)  # still held across midnight
    b.settle(r, 0.4)
    assert b.allowance("app") == pytest.approx(0.6)


async def test_global_budget_is_shared_across_callers() -> None:
    b = book(daily=1.0, callers={"a": Budget(daily_usd=0.8), "b": Budget()})
    b.settle(held(await b.reserve("a", 0.7)), 0.7)
    assert b.allowance("b") == pytest.approx(0.3)
    assert await b.reserve("c", 0.4) is None  # an unconfigured caller counts toward global too
    b.settle(held(await b.reserve("c", 0.3)), 0.3)
    assert b.allowance("a") == 0.0
    callers = b.snapshot()["callers"]
    assert isinstance(callers, dict)
    assert sorted(callers) == ["a", "b", "c"]
    assert callers["c"]["daily"] == {"limit": None, "spent": pytest.approx(0.3),
                                     "reserved": 0.0, "left": None}


def test_asking_about_a_caller_does_not_add_it() -> None:
    b = book(daily=1.0)
    assert b.allowance("stranger") == pytest.approx(1.0)
    assert b.snapshot()["callers"] == {}


async def test_concurrent_reservations_never_overspend() -> None:
    b = book(callers={"app": Budget(daily_usd=1.0)})
    start = asyncio.Event()

    async def request() -> Reservation | None:
        await start.wait()
        return await b.reserve("app", 0.1)

    tasks = [asyncio.create_task(request()) for _ in range(100)]
    await asyncio.sleep(0)
    start.set()
    results = await asyncio.gather(*tasks)
    granted = [r for r in results if r is not None]
    assert len(granted) == 10
    assert len({r.id for r in granted}) == 10
    assert b.allowance("app") == pytest.approx(0.0)


def ledger_row(request_id: str, ts: float, caller: str, route: str, cost: float) -> LedgerRow:
    return LedgerRow(
        ts=ts, request_id=request_id, caller=caller, alias="demo", route=route,
        backend="x", model_id="m", prompt_tokens=1, completion_tokens=1, cost_usd=cost,
        hosted_equiv_usd=cost, latency_s=0.1, ttft_s=None, status=200, reason="",
        endpoint="chat",
    )


async def test_load_restores_spend_from_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with Ledger(path) as ledger:
        for r in (
            ledger_row("1", at("2024-02-28T10:00:00"), "a", "hosted", 5.0),  # last month
            ledger_row("2", at("2024-03-02T10:00:00"), "a", "hosted", 0.5),  # this month
            ledger_row("3", at("2024-03-10T01:00:00"), "a", "hosted", 0.25),  # today
            ledger_row("4", at("2024-03-10T02:00:00"), "b", "hosted", 0.125),
            ledger_row("5", at("2024-03-10T03:00:00"), "a", "local", 7.0),  # not hosted
        ):
            await ledger.record(r)

    # A restart: a new process reads the file before it takes any request.
    b = book(daily=1.0, monthly=2.0, callers={"a": Budget(daily_usd=0.5)})
    restarted = Ledger(path)
    try:
        b.load(restarted)
    finally:
        restarted.close()
    assert b.allowance("a") == pytest.approx(0.25)  # a's daily: 0.5 - 0.25
    assert b.allowance("b") == pytest.approx(1.0 - 0.375)  # global daily
    snap = b.snapshot()
    g = snap["global"]
    assert isinstance(g, dict)
    assert g["daily"]["spent"] == pytest.approx(0.375)
    assert g["monthly"]["spent"] == pytest.approx(0.875)
    callers = snap["callers"]
    assert isinstance(callers, dict)
    assert callers["a"]["monthly"]["spent"] == pytest.approx(0.75)
    assert callers["b"]["daily"]["spent"] == pytest.approx(0.125)


def test_budget_book_takes_the_budgets_of_models_yaml() -> None:
    cfg = config(budget={"daily_usd": 2.0}, callers={"app": {"budget": {"daily_usd": 0.5}}})
    ledger = Ledger(MEMORY)
    try:
        b = budget_book(cfg, ledger, clock=Clock(at("2024-03-10T12:00:00")))
    finally:
        ledger.close()
    assert isinstance(b, MemoryBudgetBook)
    assert b.allowance("anyone") == pytest.approx(2.0)
    assert b.allowance("app") == pytest.approx(0.5)


async def test_reconfigure_keeps_spend_and_reservations_in_flight() -> None:
    b = book(daily=1.0, callers={"app": Budget(daily_usd=0.5), "gone": Budget(daily_usd=0.2)})
    flying = held(await b.reserve("app", 0.3))
    b.settle(held(await b.reserve("gone", 0.1)), 0.1)
    # models.yaml reloaded: tighter global budget, app's limit raised, "gone" removed.
    b.reconfigure(Budget(daily_usd=0.8), {"app": Budget(daily_usd=2.0)})
    assert b.allowance("app") == pytest.approx(0.8 - 0.1 - 0.3)  # global now binds
    b.settle(flying, 0.25)  # a call that spanned the reload is still counted
    assert b.allowance("app") == pytest.approx(0.8 - 0.1 - 0.25)
    snap = b.snapshot()
    assert snap["callers"]["gone"]["daily"]["limit"] is None  # type: ignore[index]
    assert snap["callers"]["gone"]["daily"]["spent"] == pytest.approx(0.1)  # type: ignore[index]
