"""The batch scheduler's decisions, as pure functions of what it measured: how many lines
to send hosted now (`plan_hosted`: the remainder local will not finish, spread over the
time left, with a latest-safe-start net), how many batch lines an engine may run next to
interactive traffic (`BatchConcurrency`, on a percentile of the recent interactive TTFTs,
with a floor a deadline at risk raises), and the smoothed local pace (`PaceMeter`).

No clock, no I/O: the scheduler (router/routing/batch_scheduler.py) passes the time and
the signals in, so each rule is tested as a table (tests/unit/test_batch_pacing.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostedPlan:
    """One tick's hosted decision for a batch."""

    send: int  # hosted lines to start now
    need: float  # pending lines the local pace will not finish by the target (deadline - margin)
    local_can: float  # new lines local capacity finishes by the target
    hosted_can: float  # new lines hosted finishes by the target at its concurrency
    # Lines neither local (at its pace) nor hosted (at its concurrency and latency) can
    # finish by the deadline itself: > 0 means the batch is projected to expire.
    shortfall: int


def hosted_capacity(time_s: float, latency_s: float, slots: int, in_flight: int) -> int:
    """New lines `slots` concurrent hosted calls of `latency_s` each finish within
    `time_s`: whole rounds only (a line started too late to finish does not count), less
    the slots the lines already in flight hold for the first round."""
    if time_s <= 0 or slots <= 0:
        return 0
    rounds = math.floor(time_s / max(latency_s, 1e-3))
    return max(0, slots * rounds - in_flight)


def plan_hosted(*, pending: int, local_in_flight: int, hosted_in_flight: int,
                left_s: float, margin: float, local_pace: float | None,
                hosted_latency_s: float, hosted_slots: int, tick_s: float,
                reserve_s: float = 0.0) -> HostedPlan:
    """How many lines to send hosted this tick: the larger of two shares, re-evaluated
    every tick, so a local pace that picks up sends less hosted, one that falls sends more.

    - The even share: the lines local capacity will not finish by the deadline itself
      (less `reserve_s`, about one hosted line's latency: a local pace that drops at the
      very end can still be made up), spread evenly over the time left, which keeps
      remainder x latency / time-left lines in flight hosted. It starts as soon as a
      remainder appears: a remainder found early is paid at the same price as one found
      late, but leaves time to act when the local pace falls (as it does when hosted
      calls share the machine's cores), and hosted never takes it all at once at the end.
    - The latest safe start, the safety net: the target is the deadline less `margin` of
      the time left (never closer to it than `reserve_s`). Local capacity is expected to
      finish `local_pace` x target lines (those in flight among them); the rest (`need`)
      is hosted's. Once waiting one more tick would leave hosted, at `hosted_slots`
      concurrent calls of `hosted_latency_s` each, unable to finish `need` by the
      target, enough goes now to keep it within what hosted can still do.

    `local_pace` None: not measured yet, nothing is sent (the scheduler gives the engines
    a moment first). `pending`: lines not started; lines in flight count as work of their
    route."""
    if left_s <= 0:
        return HostedPlan(0, float(pending), 0.0, 0.0, pending)
    if local_pace is None:
        return HostedPlan(0, 0.0, 0.0, 0.0, 0)
    target = max(0.0, min(left_s * (1 - margin), left_s - reserve_s))
    local_can = max(0.0, local_pace * target - local_in_flight)
    need = pending - local_can
    hosted_can = float(hosted_capacity(target, hosted_latency_s, hosted_slots,
                                       hosted_in_flight))
    local_full = max(0.0, local_pace * left_s - local_in_flight)
    hosted_full = hosted_capacity(left_s, hosted_latency_s, hosted_slots, hosted_in_flight)
    shortfall = max(0, math.ceil(pending - local_full - hosted_full - 1e-9))
    send = 0
    if need > 0:
        later = hosted_capacity(target - tick_s, hosted_latency_s, hosted_slots,
                                hosted_in_flight)
        due = math.ceil(need - later - 1e-9) if need > later else 0
        # The remainder local will not finish by the deadline itself (less one hosted line's
        # time): spread evenly over the time left, it keeps rate x latency lines in flight.
        # Started as soon as it appears, a remainder is learnt while there is time to act
        # on it, and hosted never takes it all at once at the end (where its calls share
        # the machine, and the provider's rate limits, with everything else).
        spread_s = max(tick_s, left_s - reserve_s)
        remainder = pending - max(0.0, local_pace * spread_s - local_in_flight)
        even = math.ceil(remainder * hosted_latency_s / spread_s - 1e-9) if remainder > 0 else 0
        free = max(0, hosted_slots - hosted_in_flight)
        send = min(free, pending, max(due, even - hosted_in_flight))
    return HostedPlan(send, need, local_can, hosted_can, shortfall)


class PaceMeter:
    """Local lines finished a second, over the last `window_s` (or since the first line
    started, when that is shorter): a moving average, so one slow or fast second does not
    swing the hosted share."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._done: deque[float] = deque()
        self._since: float | None = None

    def started(self, now: float) -> None:
        """The batch started (the pace is measured from then on)."""
        if self._since is None:
            self._since = now

    def finished(self, now: float) -> None:
        self._done.append(now)

    def pace(self, now: float, warmup_s: float) -> float | None:
        """Lines a second; None before `warmup_s` of measuring (the first line or two
        finished say little about the rate)."""
        while self._done and self._done[0] < now - self.window_s:
            self._done.popleft()
        if self._since is None:
            return None
        measured = min(self.window_s, now - self._since)
        if measured < warmup_s:
            return None
        return len(self._done) / max(measured, 1e-3)


class TtftWindow:
    """The local interactive TTFTs an engine's requests saw over the last `window_s`: the
    controller reads a percentile of them, never one request's, so a single outlier (a
    stalled process, one long prompt) neither cuts the batch nor passes for the engine's
    state."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: deque[tuple[float, float]] = deque()

    def add(self, now: float, ttft_s: float) -> None:
        self._seen.append((now, ttft_s))

    def since(self, now: float, start: float) -> list[float]:
        """The TTFTs seen after `start` within the window, in arrival order."""
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        return [ttft for at, ttft in self._seen if at > start]


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile: 0.9 of 10 values is the 9th smallest, so from 10
    values on the largest alone is never the p90."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Aimd:
    slo_s: float
    cut_at: float = 0.7  # cut when the window's percentile TTFT reaches this share of the SLO
    grow_below: float = 0.5  # grow only while it (every TTFT, before min_samples) is under
    # The signal: the `percentile` of the local interactive TTFTs of the last `window_s`
    # seen since the last cut, once there are `min_samples` of them (10 at p90: one outlier
    # is never the percentile, two in ten are). Fewer: no cut, growth only while every one
    # is under grow_below.
    percentile: float = 0.9
    window_s: float = 5.0
    min_samples: int = 10
    decrease: float = 0.5  # the multiplicative cut
    increase_per_s: float = 1.0  # the additive growth, lines a second
    # Until the first cut the limit doubles every second instead (TCP's slow start): an
    # engine with room for 30 batch lines is not 30 s in reaching them, during which the
    # hosted plan would read a ramp's pace as the engine's and send hosted what local
    # capacity was about to finish.
    slow_start: bool = True
    floor: float = 1.0
    cooldown_s: float = 1.0  # after a cut, the next is not before this (signals lag)
    hold_s: float = 2.0  # nor any growth: a quiet tick right after a cut is no all-clear
    # A batch projected to miss its deadline raises the floor: from the limit then in use
    # by this many lines a second (up to the ceiling), whatever interactive TTFTs say (the
    # deadline outranks the comfort margin below the SLO; routing's batch_below stays the
    # hard line per request). It holds while the batch still needs more than local
    # capacity gives by its target (the pace it bought would otherwise be cut again and
    # the risk come back late, when hosted can no longer make it up), and falls back this
    # fast once local capacity alone is projected to finish in time.
    deadline_rise_per_s: float = 2.0
    deadline_fall_per_s: float = 0.5


class BatchConcurrency:
    """Batch lines an engine may run at once next to interactive traffic: AIMD on the
    interactive signal. `observe` feeds each local interactive TTFT the router sees; `step`
    grows the limit (doubling every second until the first cut, then by `increase_per_s`)
    while the window's percentile TTFT stays well
    inside the SLO (or there is no interactive traffic) and the limit is in use, halves it
    as soon as the percentile nears the SLO or the engine queues with interactive requests
    in flight (at most once a `cooldown_s`, no growth for `hold_s` after a cut, and only
    TTFTs seen after a cut count towards the next), and holds in between. While a batch on
    the engine is projected to miss its deadline (`at_risk`) a floor rises under the limit
    (`deadline_rise_per_s`), so cuts stop at it; it holds until the batches on the engine
    have `slack` again (local capacity alone finishes them by the target). `ceiling` (the
    scheduler's cap; routing's `saturation.batch_below` stays the hard line per request)
    bounds both."""

    def __init__(self, params: Aimd, start: float = 1.0) -> None:
        self.params = params
        self.limit = max(params.floor, start)
        self.deadline_floor = 0.0
        self.ttfts = TtftWindow(params.window_s)
        self._cut_at = -math.inf
        self._at: float | None = None
        self.cuts = 0
        self.signal: float | None = None  # the last step's percentile TTFT (None: too few)

    def observe(self, now: float, ttft_s: float) -> None:
        """A local interactive request's time to first token."""
        self.ttfts.add(now, ttft_s)

    def step(self, now: float, *, queued: bool, in_use: bool, ceiling: float,
             at_risk: bool = False, slack: bool = True) -> float:
        p = self.params
        dt = 0.0 if self._at is None else max(0.0, now - self._at)
        self._at = now
        before = self.limit
        seen = self.ttfts.since(now, self._cut_at)
        enough = len(seen) >= p.min_samples
        self.signal = quantile(seen, p.percentile) if enough else None
        hot = queued or (self.signal is not None and self.signal >= p.cut_at * p.slo_s)
        calm = (self.signal < p.grow_below * p.slo_s if self.signal is not None
                else all(t < p.grow_below * p.slo_s for t in seen))
        if hot:
            if now - self._cut_at >= p.cooldown_s:
                self.limit = self.limit * p.decrease
                self._cut_at = now
                self.cuts += 1
        elif calm and in_use:
            since = max(now - dt, self._cut_at + p.hold_s)
            grow_s = max(0.0, now - since)
            if p.slow_start and self.cuts == 0:
                self.limit *= 2.0 ** grow_s
            else:
                self.limit += p.increase_per_s * grow_s
        top = max(p.floor, ceiling)
        if at_risk and in_use:
            # From the limit the step began with: this step's cut is what it stops.
            self.deadline_floor = min(top, max(self.deadline_floor, before)
                                      + p.deadline_rise_per_s * dt)
        elif slack and not at_risk:
            self.deadline_floor = max(0.0, self.deadline_floor - p.deadline_fall_per_s * dt)
        self.limit = min(max(self.limit, p.floor, self.deadline_floor), top)
        return self.limit

    @property
    def allowed(self) -> int:
        """Whole lines the limit allows now."""
        return max(0, math.floor(self.limit + 1e-9))
