"""The batch scheduler's decisions, as pure functions of what it measured: how many lines
to send hosted now (`plan_hosted`), how many batch lines an engine may run next to
interactive traffic (`BatchConcurrency`), and the smoothed local pace (`PaceMeter`).

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
    """The "latest safe start" rule. The target is the deadline less `margin` of the time
    left, and never closer to it than `reserve_s` (the scheduler keeps about one hosted
    line's latency: a local pace that drops at the very end can still be made up).
    Local capacity is expected to finish `local_pace` x target lines (those in flight
    among them); the rest (`need`) is hosted's. Hosted lines go out only once waiting one
    more tick would leave hosted, at `hosted_slots` concurrent calls of
    `hosted_latency_s` each, unable to finish `need` by the target; then just enough to
    keep `need` within what hosted can still do. Re-evaluated every tick, so a local pace
    that picks up sends less hosted, one that falls sends more.

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
        if need > later:
            free = max(0, hosted_slots - hosted_in_flight)
            send = min(free, pending, math.ceil(need - later - 1e-9))
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


@dataclass(frozen=True, slots=True)
class Interactive:
    """What the router saw of an engine's interactive traffic since the last step."""

    ttft_s: float | None  # the worst time to first token of those that finished; None: none
    queued: bool  # the engine reports requests waiting while interactive ones are in flight


@dataclass(frozen=True, slots=True)
class Aimd:
    slo_s: float
    cut_at: float = 0.7  # cut when an interactive TTFT reaches this share of the SLO
    grow_below: float = 0.5  # grow only while every interactive TTFT is under this share
    decrease: float = 0.5  # the multiplicative cut
    increase_per_s: float = 1.0  # the additive growth, lines a second
    floor: float = 1.0
    cooldown_s: float = 1.0  # after a cut, the next is not before this (signals lag)
    hold_s: float = 2.0  # nor any growth: a quiet tick right after a cut is no all-clear


class BatchConcurrency:
    """Batch lines an engine may run at once next to interactive traffic: AIMD on the
    interactive signal. It grows by `increase_per_s` while interactive requests see a TTFT
    well inside the SLO (or there are none) and the limit is in use, halves as soon as one
    nears the SLO or the engine queues with interactive requests in flight (at most once
    a `cooldown_s`, and no growth for `hold_s` after a cut), and holds in between.
    `ceiling` (the scheduler's cap; routing's `saturation.batch_below` stays the hard
    line per request) bounds it."""

    def __init__(self, params: Aimd, start: float = 1.0) -> None:
        self.params = params
        self.limit = max(params.floor, start)
        self._cut_at = -math.inf
        self._at: float | None = None
        self.cuts = 0

    def step(self, now: float, signal: Interactive, *, in_use: bool,
             ceiling: float) -> float:
        p = self.params
        dt = 0.0 if self._at is None else max(0.0, now - self._at)
        self._at = now
        ttft = signal.ttft_s
        hot = signal.queued or (ttft is not None and ttft >= p.cut_at * p.slo_s)
        if hot:
            if now - self._cut_at >= p.cooldown_s:
                self.limit = self.limit * p.decrease
                self._cut_at = now
                self.cuts += 1
        elif (ttft is None or ttft < p.grow_below * p.slo_s) and in_use:
            since = max(now - dt, self._cut_at + p.hold_s)
            self.limit += p.increase_per_s * max(0.0, now - since)
        self.limit = min(max(self.limit, p.floor), max(p.floor, ceiling))
        return self.limit

    @property
    def allowed(self) -> int:
        """Whole lines the limit allows now."""
        return max(0, math.floor(self.limit + 1e-9))
