"""What calls cost, and hosted spend held against budgets.

A hosted call reserves its estimated cost before it starts and settles the actual cost
when it ends, so concurrent requests see each other's spend before it happens. Budgets
run per UTC day and per UTC month, per caller and for everyone together.

`Budgets` is the protocol the router holds; `MemoryBudgetBook` below implements it in this
process, `budgets_pg.PgBudgetBook` in PostgreSQL for every replica. They share the pure
helpers here (`capped`, `left`, `report`, the window starts), nothing else.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from router.accounting.ledger import CallLedger
from router.config import Budget, GlobalBudget

_DAY_S = 86400.0
# Reservations are sums of floats: 3 x 0.1 must fit a 0.3 budget. A billionth of a
# dollar is far below any price, so it can never let a real overspend through.
TOLERANCE_USD = 1e-9

def local_cost_per_mtok(gpu_hour_usd: float, tokens_per_s: float | None) -> float | None:
    """USD per million tokens on a GPU that costs `gpu_hour_usd` and delivers `tokens_per_s`.

    None while the throughput is unknown; a GPU that costs nothing is free whatever it does.
    """
    if gpu_hour_usd < 0:
        raise ValueError("gpu_hour_usd must not be negative")
    if gpu_hour_usd == 0:
        return 0.0
    if tokens_per_s is None or tokens_per_s <= 0:
        return None
    return gpu_hour_usd / (tokens_per_s * 3600.0) * 1e6


def day_start(now_wall: float) -> float:
    """Unix time of the UTC midnight that began the day of `now_wall`."""
    # Unix time has no leap seconds: every UTC day is exactly 86,400 of its seconds.
    return now_wall - now_wall % _DAY_S


def month_start(now_wall: float) -> float:
    """Unix time of 00:00 UTC on the first of the month of `now_wall`."""
    now = datetime.fromtimestamp(now_wall, tz=UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def capped(budget: Budget, global_budget: Budget) -> Budget:
    """A caller's limits once the global budget's max_caller_share applies to them: one
    caller can never spend or hold more than its share of everyone's budget."""
    share = global_budget.max_caller_share if isinstance(global_budget, GlobalBudget) else None
    if share is None:
        return budget

    def cap(own: float | None, total: float | None) -> float | None:
        if total is None:
            return own
        return total * share if own is None else min(own, total * share)

    return Budget(daily_usd=cap(budget.daily_usd, global_budget.daily_usd),
                  monthly_usd=cap(budget.monthly_usd, global_budget.monthly_usd))


def unlimited(budget: Budget) -> bool:
    return budget.daily_usd is None and budget.monthly_usd is None


def left(budget: Budget, daily_spent: float, monthly_spent: float,
         held: float) -> float | None:
    """USD left under `budget` (the tighter of its windows) net of money held; negative
    when overspent, None when it has no limit."""
    lefts = [limit - spent - held
             for limit, spent in ((budget.daily_usd, daily_spent),
                                  (budget.monthly_usd, monthly_spent))
             if limit is not None]
    return min(lefts) if lefts else None


def report(budget: Budget, daily_spent: float, monthly_spent: float,
           held: float) -> dict[str, object]:
    """One scope as the status API shows it: limit, spent, reserved, left per period."""
    out: dict[str, object] = {}
    for period, limit, spent in (("daily", budget.daily_usd, daily_spent),
                                 ("monthly", budget.monthly_usd, monthly_spent)):
        out[period] = {
            "limit": limit,
            "spent": spent,
            "reserved": held,
            "left": None if limit is None else max(0.0, limit - spent - held),
        }
    return out


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    caller: str
    amount_usd: float


class Budgets(Protocol):
    """Hosted spend held against the budgets of models.yaml, per caller and for everyone,
    per UTC day and month. Two implementations: `MemoryBudgetBook` (this process) and
    `PgBudgetBook` (every replica sharing one PostgreSQL database); `storage.budget_book`
    picks the one that goes with the ledger."""

    def load(self, ledger: CallLedger) -> None:
        """At start and on reload, before any reservation: what was spent before."""

    def reconfigure(self, global_budget: Budget, caller_budgets: Mapping[str, Budget]) -> None:
        """New limits from a reloaded models.yaml; spend and reservations in flight stay,
        so a call that spans the reload is still counted when it settles. A caller that
        left the file keeps its spend, without a limit of its own."""

    def allowance(self, caller: str) -> float | None:
        """USD the caller may still reserve: the least left across its daily and monthly
        budgets (capped at its share of the global ones) and the global ones, net of
        outstanding reservations. None: no budget. A planning hint: `reserve` decides."""

    def caller_allowance(self, caller: str) -> float | None:
        """USD left in the caller's own limits (its budget, its share of the global one),
        without the global budget's state: what a caller may be shown. None: no limit."""

    async def reserve(self, caller: str, amount_usd: float) -> Reservation | None:
        """Check and hold `amount_usd` for a hosted call in one step; None when the
        budgets cannot cover it. ValueError for a negative amount."""

    def settle(self, r: Reservation, actual_usd: float) -> None:
        """The call ended and cost `actual_usd` (which may exceed what was reserved).
        ValueError when `r` is already settled or released: it would count twice."""

    def release(self, r: Reservation) -> None:
        """The call never happened. Releasing a settled or released reservation does
        nothing, so a `finally:` may release unconditionally."""

    def snapshot(self) -> dict[str, object]:
        """For the status API and metrics: `report` of the global scope and of every
        configured caller and every caller that has spent."""


@dataclass(slots=True)
class _Window:
    start: float = -math.inf
    spent: float = 0.0


@dataclass(slots=True)
class _Account:
    """Spend of one scope (a caller, or everyone) against its budget."""

    budget: Budget
    daily: _Window = field(default_factory=_Window)
    monthly: _Window = field(default_factory=_Window)
    reserved: float = 0.0
    holds: int = 0

    def roll(self, today: float, this_month: float) -> None:
        if self.daily.start != today:
            self.daily = _Window(today)
        if self.monthly.start != this_month:
            self.monthly = _Window(this_month)

    def left(self) -> float | None:
        return left(self.budget, self.daily.spent, self.monthly.spent, self.reserved)

    def hold(self, amount: float) -> None:
        self.reserved += amount
        self.holds += 1

    def unhold(self, amount: float) -> None:
        self.holds -= 1
        # Adding and taking away floats drifts; with nothing held the truth is zero.
        self.reserved = 0.0 if self.holds == 0 else max(0.0, self.reserved - amount)

    def spend(self, amount: float) -> None:
        self.daily.spent += amount
        self.monthly.spent += amount

    def report(self) -> dict[str, object]:
        return report(self.budget, self.daily.spent, self.monthly.spent, self.reserved)


class MemoryBudgetBook:
    """`Budgets` in this process: the SQLite ledger's companion.

    reserve() checks and books in one step (it never awaits), so concurrent requests in
    one process cannot overspend by more than one reservation. Not thread-safe: use it
    from the event loop only.
    """

    def __init__(
        self,
        global_budget: Budget,
        caller_budgets: Mapping[str, Budget],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._global = _Account(global_budget)
        self._callers = {name: _Account(capped(budget, global_budget))
                         for name, budget in caller_budgets.items()}
        self._held: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    def reconfigure(self, global_budget: Budget, caller_budgets: Mapping[str, Budget]) -> None:
        self._global.budget = global_budget
        for name, account in self._callers.items():
            account.budget = capped(caller_budgets.get(name, Budget()), global_budget)
        for name, budget in caller_budgets.items():
            if name not in self._callers:
                self._callers[name] = _Account(capped(budget, global_budget))

    def _roll(self) -> tuple[float, float]:
        """Start new windows where the clock has passed midnight or the month's start."""
        now = self._clock()
        today, this_month = day_start(now), month_start(now)
        self._global.roll(today, this_month)
        for account in self._callers.values():
            account.roll(today, this_month)
        return today, this_month

    def _accounts(self, caller: str, *, create: bool = True) -> tuple[_Account, ...]:
        """The caller's account and the global one, both rolled over to the clock's now.

        Without `create`, a caller the book has never seen has no account of its own, so
        merely asking about a caller does not add it to the snapshot.
        """
        today, this_month = self._roll()
        account = self._callers.get(caller)
        if account is None:
            if not create:
                return (self._global,)
            # Callers without a budget of their own still count toward the global one.
            account = self._callers[caller] = _Account(capped(Budget(), self._global.budget))
            account.roll(today, this_month)
        return account, self._global

    def load(self, ledger: CallLedger) -> None:
        """Seed today's and this month's hosted spend from the ledger: a restart forgets
        nothing. Replaces what the book had counted."""
        today, this_month = self._roll()
        for account in (self._global, *self._callers.values()):
            account.daily.spent = account.monthly.spent = 0.0
        for since, period in ((today, "daily"), (this_month, "monthly")):
            for caller, cost in ledger.spend_by_caller(since=since, route="hosted").items():
                for account in self._accounts(caller):
                    window = account.daily if period == "daily" else account.monthly
                    window.spent += cost

    def allowance(self, caller: str) -> float | None:
        accounts = self._accounts(caller, create=False)
        if len(accounts) == 1:  # a caller with nothing spent yet: still bound by its share
            accounts = (*accounts, _Account(capped(Budget(), self._global.budget)))
        lefts = [x for account in accounts if (x := account.left()) is not None]
        return max(0.0, min(lefts)) if lefts else None

    def caller_allowance(self, caller: str) -> float | None:
        accounts = self._accounts(caller, create=False)
        own = (accounts[0] if len(accounts) == 2
               else _Account(capped(Budget(), self._global.budget)))
        x = own.left()
        return None if x is None else max(0.0, x)

    async def reserve(self, caller: str, amount_usd: float) -> Reservation | None:
        # Async for the protocol's sake (the shared book asks its database); this one
        # never awaits, so the check and the hold are one step.
        if not amount_usd >= 0:
            raise ValueError(f"a reservation must be a non-negative amount, not {amount_usd}")
        allowance = self.allowance(caller)
        if allowance is not None and amount_usd > allowance + TOLERANCE_USD:
            return None
        reservation = Reservation(next(self._ids), caller, amount_usd)
        self._held[reservation.id] = reservation
        for account in self._accounts(caller):
            account.hold(amount_usd)
        return reservation

    def settle(self, r: Reservation, actual_usd: float) -> None:
        if not actual_usd >= 0:
            raise ValueError(f"a cost must be a non-negative amount, not {actual_usd}")
        if self._held.pop(r.id, None) is None:
            raise ValueError(f"reservation {r.id} is already settled or released")
        for account in self._accounts(r.caller):
            account.unhold(r.amount_usd)
            account.spend(actual_usd)

    def release(self, r: Reservation) -> None:
        if self._held.pop(r.id, None) is None:
            return
        for account in self._accounts(r.caller):
            account.unhold(r.amount_usd)

    def snapshot(self) -> dict[str, object]:
        self._roll()
        callers = {name: self._callers[name].report() for name in sorted(self._callers)}
        return {"global": self._global.report(), "callers": callers}
