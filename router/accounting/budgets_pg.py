"""Budgets held in PostgreSQL: one set of budgets for every replica sharing the database.

A reservation is one transaction under an advisory lock: read the settled spend of the
caller's and the global windows plus every unexpired hold, then insert a hold or refuse.
Replicas take turns on the lock, so two of them racing for the last dollars cannot both
get them. The ledger writer turns a hold into spend (settle) or deletes it (release) in
its next transaction; a replica that dies leaves holds that stop counting at their expiry,
the request deadline.

`allowance` and `snapshot` are planning hints and status: they read a view refreshed in
the background (and by each reservation), never the database on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg

from router.accounting.budgets import (
    TOLERANCE_USD,
    Reservation,
    capped,
    day_start,
    left,
    month_start,
    report,
    unlimited,
)
from router.accounting.ledger import CallLedger, LedgerError, StoreUnavailable
from router.accounting.ledger_pg import Conn, HoldReleased, HoldSettled, PgLedger
from router.accounting.ledger_spool import first_line
from router.accounting.pg import BUDGET_LOCK, GLOBAL_SCOPE, scope_of
from router.config import Budget

log = logging.getLogger("spillover.budgets")

VIEW_MAX_AGE_S = 1.0
# Expired holds stop counting at once; they are deleted a while later, by whoever refreshes.
_PURGE_AFTER_S = 60.0

_STATE = """SELECT
    (SELECT COALESCE(SUM(spent), 0) FROM budget_spend
       WHERE scope = %(c)s AND period = 'daily' AND start = %(day)s),
    (SELECT COALESCE(SUM(spent), 0) FROM budget_spend
       WHERE scope = %(c)s AND period = 'monthly' AND start = %(month)s),
    (SELECT COALESCE(SUM(spent), 0) FROM budget_spend
       WHERE scope = %(g)s AND period = 'daily' AND start = %(day)s),
    (SELECT COALESCE(SUM(spent), 0) FROM budget_spend
       WHERE scope = %(g)s AND period = 'monthly' AND start = %(month)s),
    (SELECT COALESCE(SUM(amount_usd), 0) FROM budget_holds
       WHERE caller = %(caller)s AND expires_at >= %(now)s),
    (SELECT COALESCE(SUM(amount_usd), 0) FROM budget_holds WHERE expires_at >= %(now)s)"""


@dataclass(slots=True)
class _Scope:
    """What the database said about one scope: settled spend per window, money held."""

    daily: float = 0.0
    monthly: float = 0.0
    held: float = 0.0


@dataclass(slots=True)
class _View:
    day: float = -1.0
    month: float = -1.0
    scopes: dict[str, _Scope] = field(default_factory=dict)
    at: float = -1.0  # monotonic time of the read


class PgBudgetBook:
    """`Budgets` in PostgreSQL. reserve() awaits one database transaction; settle() and
    release() only queue work for the ledger writer, so they stay synchronous."""

    def __init__(
        self,
        global_budget: Budget,
        caller_budgets: Mapping[str, Budget],
        ledger: PgLedger,
        *,
        hold_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._ledger = ledger
        self._hold_ttl_s = hold_ttl_s
        self._limits = {name: budget for name, budget in caller_budgets.items()}
        self._global_limit = global_budget
        self._local_ids = itertools.count(1)
        self._holds: dict[int, int | None] = {}  # reservation id -> hold id (None: no hold)
        self._view = _View()
        self._refreshing: asyncio.Task[None] | None = None
        self._failing_since: float | None = None  # monotonic: reservations fail since
        self._view_failing = False

    def reconfigure(self, global_budget: Budget, caller_budgets: Mapping[str, Budget]) -> None:
        # Nothing of the spend lives here: the new limits apply to the next reservation.
        self._limits = dict(caller_budgets)
        self._global_limit = global_budget

    # -- reserve / settle / release -----------------------------------------------------

    async def reserve(self, caller: str, amount_usd: float) -> Reservation | None:
        if not amount_usd >= 0:
            raise ValueError(f"a reservation must be a non-negative amount, not {amount_usd}")
        caller_limit = capped(self._limits.get(caller, Budget()), self._global_limit)
        r = Reservation(next(self._local_ids), caller, amount_usd)
        if unlimited(caller_limit) and unlimited(self._global_limit):
            # Nothing to hold against: no round trip. The spend is still counted at settle.
            self._holds[r.id] = None
            return r
        now = self._clock()
        day, month = day_start(now), month_start(now)
        params = {"c": scope_of(caller), "g": GLOBAL_SCOPE, "caller": caller, "day": day,
                  "month": month, "now": now}

        def transaction(conn: Conn) -> tuple[int | None, tuple[float, ...]]:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (BUDGET_LOCK,))
                state = conn.execute(_STATE, params).fetchone()
                assert state is not None
                c_day, c_month, g_day, g_month, c_held, g_held = map(float, state)
                lefts = [x for x in (left(caller_limit, c_day, c_month, c_held),
                                     left(self._global_limit, g_day, g_month, g_held))
                         if x is not None]
                if lefts and amount_usd > max(0.0, min(lefts)) + TOLERANCE_USD:
                    return None, (c_day, c_month, c_held, g_day, g_month, g_held)
                inserted = conn.execute(
                    "INSERT INTO budget_holds (caller, amount_usd, expires_at)"
                    " VALUES (%s, %s, %s) RETURNING id",
                    (caller, amount_usd, now + self._hold_ttl_s)).fetchone()
                assert inserted is not None
                return int(inserted[0]), (c_day, c_month, c_held + amount_usd,
                                          g_day, g_month, g_held + amount_usd)

        if not self._ledger.accepting:
            return None  # shutting down: nothing more is reserved
        try:
            hold_id, (c_day, c_month, c_held, g_day, g_month, g_held) = (
                await self._ledger.budget_call(transaction))
        except (psycopg.Error, LedgerError, ConnectionError) as exc:
            # Fail closed: a budget that cannot be checked is not spent. The request still
            # runs locally where it can, else it is refused as unavailable (503), not as
            # over budget: nothing says the budget is spent.
            self._outage(exc)
            raise StoreUnavailable(
                f"hosted spend cannot be reserved: the budget store ({self._ledger.path}) "
                "did not answer; retry later") from None
        self._outage(None)
        if self._view.day == day and self._view.month == month:
            # Fresher than the view for these two scopes: what planning should see next.
            self._view.scopes[scope_of(caller)] = _Scope(c_day, c_month, c_held)
            self._view.scopes[GLOBAL_SCOPE] = _Scope(g_day, g_month, g_held)
        if hold_id is None:
            return None
        self._holds[r.id] = hold_id
        return r

    def _outage(self, exc: BaseException | None) -> None:
        """One warning when reservations start failing, one when they work again."""
        if exc is not None and self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("budget reservations fail, the database does not answer (%s): hosted "
                        "requests are refused with 503 until it does", first_line(exc))
        elif exc is None and self._failing_since is not None:
            log.warning("budget reservations work again after %.1f s",
                        time.monotonic() - self._failing_since)
            self._failing_since = None

    def settle(self, r: Reservation, actual_usd: float) -> None:
        if not actual_usd >= 0:
            raise ValueError(f"a cost must be a non-negative amount, not {actual_usd}")
        if r.id not in self._holds:
            raise ValueError(f"reservation {r.id} is already settled or released")
        hold_id = self._holds.pop(r.id)
        now = self._clock()
        self._queue(HoldSettled(hold_id or 0, r.caller, actual_usd, day_start(now),
                                month_start(now)))
        for scope in self._scopes_of(r.caller):
            scope.held = max(0.0, scope.held - (r.amount_usd if hold_id else 0.0))
            scope.daily += actual_usd
            scope.monthly += actual_usd

    def release(self, r: Reservation) -> None:
        if r.id not in self._holds:
            return
        hold_id = self._holds.pop(r.id)
        if hold_id is not None:
            self._queue(HoldReleased(hold_id))
            for scope in self._scopes_of(r.caller):
                scope.held = max(0.0, scope.held - r.amount_usd)

    def _queue(self, outcome: HoldSettled | HoldReleased) -> None:
        try:
            self._ledger.hold_done(outcome)
        except LedgerError as exc:
            # Shutting down: the hold expires at its deadline instead.
            log.error("budget hold %s not queued: %s", outcome.hold_id, exc)

    def _scopes_of(self, caller: str) -> list[_Scope]:
        return [s for key in (scope_of(caller), GLOBAL_SCOPE)
                if (s := self._view.scopes.get(key)) is not None]

    # -- the view: allowance, snapshot ----------------------------------------------------

    def load(self, ledger: CallLedger) -> None:
        """Read the view now (at start and on reload): the spend itself lives in the
        database, so there is nothing to seed."""
        self._view = self._ledger.read(self._read_view)

    async def refresh(self) -> None:
        self._view = await asyncio.to_thread(self._ledger.read, self._read_view)

    def _read_view(self, conn: Conn) -> _View:
        now = self._clock()
        view = _View(day_start(now), month_start(now), {}, time.monotonic())
        spend = conn.execute(
            "SELECT scope, period, spent FROM budget_spend"
            " WHERE (period = 'daily' AND start = %s) OR (period = 'monthly' AND start = %s)",
            (view.day, view.month)).fetchall()
        for scope, period, spent in spend:
            s = view.scopes.setdefault(scope, _Scope())
            if period == "daily":
                s.daily = float(spent)
            else:
                s.monthly = float(spent)
        held = conn.execute(
            "SELECT caller, SUM(amount_usd) FROM budget_holds WHERE expires_at >= %s"
            " GROUP BY caller", (now,)).fetchall()
        total = 0.0
        for caller, amount in held:
            view.scopes.setdefault(scope_of(caller), _Scope()).held = float(amount)
            total += float(amount)
        view.scopes.setdefault(GLOBAL_SCOPE, _Scope()).held = total
        conn.execute("DELETE FROM budget_holds WHERE expires_at < %s", (now - _PURGE_AFTER_S,))
        return view

    def _fresh_view(self) -> _View:
        """The view, asking for a refresh in the background when it is old."""
        stale = time.monotonic() - self._view.at > VIEW_MAX_AGE_S
        if stale and (self._refreshing is None or self._refreshing.done()):
            # No loop (a synchronous caller): the view stays as it is.
            with contextlib.suppress(RuntimeError):
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())
        return self._view

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            if not self._view_failing:  # once an outage, not once a second
                log.warning("budget view not refreshed: %s", first_line(exc))
            self._view_failing = True
        else:
            self._view_failing = False

    def _scope(self, scope: str) -> _Scope:
        """What the view says of `scope`; nothing spent or held when the view is from
        another day or month than the clock's (yesterday's spend says nothing of today)."""
        view = self._fresh_view()
        now = self._clock()
        if view.day == day_start(now) and view.month == month_start(now):
            return view.scopes.get(scope, _Scope())
        return _Scope()

    def _left(self, scope: str, budget: Budget) -> float | None:
        s = self._scope(scope)
        return left(budget, s.daily, s.monthly, s.held)

    def _report(self, scope: str, budget: Budget) -> dict[str, object]:
        s = self._scope(scope)
        return report(budget, s.daily, s.monthly, s.held)

    def allowance(self, caller: str) -> float | None:
        own = capped(self._limits.get(caller, Budget()), self._global_limit)
        lefts = [x for x in (self._left(GLOBAL_SCOPE, self._global_limit),
                             None if unlimited(own) else self._left(scope_of(caller), own))
                 if x is not None]
        return max(0.0, min(lefts)) if lefts else None

    def caller_allowance(self, caller: str) -> float | None:
        own = capped(self._limits.get(caller, Budget()), self._global_limit)
        x = None if unlimited(own) else self._left(scope_of(caller), own)
        return None if x is None else max(0.0, x)

    def snapshot(self) -> dict[str, object]:
        view = self._fresh_view()
        names = set(self._limits)
        names.update(k.removeprefix("caller:") for k in view.scopes if k != GLOBAL_SCOPE)
        callers = {name: self._report(scope_of(name),
                                      capped(self._limits.get(name, Budget()),
                                             self._global_limit))
                   for name in sorted(names)}
        return {"global": self._report(GLOBAL_SCOPE, self._global_limit), "callers": callers}
