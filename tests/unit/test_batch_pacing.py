"""The batch scheduler's decisions as tables (router/routing/batch_pacing.py): the hosted
share (the remainder local will not finish, spread evenly over the time left, with a
"latest safe start" net within hosted's concurrency and latency, and the projected miss
of the deadline), the smoothed local pace, and the engines' adaptive batch
concurrency (AIMD on a percentile of the interactive TTFTs, with the floor a deadline at
risk raises). Fake clocks, no process."""

from __future__ import annotations

import pytest

from router.config import Batches
from router.routing.batch_pacing import (
    Aimd,
    BatchConcurrency,
    PaceMeter,
    hosted_capacity,
    plan_hosted,
    quantile,
)


@pytest.mark.parametrize(("time_s", "latency_s", "slots", "in_flight", "lines"), [
    (10.0, 2.0, 8, 0, 40),   # 5 rounds of 8
    (10.0, 2.0, 8, 3, 37),   # the 3 in flight hold slots of the first round
    (1.9, 2.0, 8, 0, 0),     # no line started now finishes in time
    (0.0, 2.0, 8, 0, 0),
    (10.0, 2.0, 0, 0, 0),    # no hosted slots (on-prem, no batch price)
    (7.0, 2.0, 1, 1, 2),     # 3 whole rounds, one taken
])
def test_hosted_capacity_counts_whole_rounds(time_s: float, latency_s: float, slots: int,
                                             in_flight: int, lines: int) -> None:
    assert hosted_capacity(time_s, latency_s, slots, in_flight) == lines


# pending, local in flight, hosted in flight, time left, local pace -> send, shortfall
# (margin 0.2, reserve 2.5 s, hosted: 8 slots, 2 s a line, ticks of 0.5 s)
PLAN = [
    # Local finishes everything with room to spare: nothing hosted.
    (100, 4, 0, 100.0, 2.0, 0, 0),
    # Local (2 x 80 - 4 = 156) falls 64 lines short of the target, and hosted could still
    # do 8 x 39 after the next tick: no hurry (the first rule sent all 64 at once). By the
    # deadline itself (less the reserve, 97.5 s) local falls 29 short: spread evenly,
    # 29 x 2 s / 97.5 s keeps one line in flight, which goes now.
    (220, 4, 0, 100.0, 2.0, 1, 0),
    # The latest safe start: target 16 s, local 2 x 16 - 4 = 28, need 60; after one
    # more tick hosted could still do 8 x floor(15.5 / 2) = 56: 4 are due now. The
    # even share is more (57 short by 17.5 s: 7 in flight): 7 go.
    (88, 4, 0, 20.0, 2.0, 7, 0),
    # ...never more than the free slots (6 in flight: 50 later, 10 due now, 2 free).
    (88, 4, 6, 20.0, 2.0, 2, 0),
    # Close to the deadline the reserve, not the margin, sets the target (7.5 s of 10).
    # Beyond what even hosted at full concurrency does by the deadline: every slot now,
    # and the miss projected. Local 2 x 10 - 4 = 16, hosted 8 x 5 = 40: 44 lines short.
    (100, 4, 0, 10.0, 2.0, 8, 44),
    # A pace not measured yet: nothing sent, nothing projected.
    (100, 0, 0, 10.0, None, 0, 0),
    # The deadline passed: everything pending misses it.
    (7, 0, 0, 0.0, 2.0, 0, 7),
    # Local finishes it, hosted slots all busy: nothing more.
    (10, 4, 8, 30.0, 2.0, 0, 0),
]


@pytest.mark.parametrize(("pending", "local", "hosted", "left", "pace", "send", "short"),
                         PLAN)
def test_plan_hosted_table(pending: int, local: int, hosted: int, left: float,
                           pace: float | None, send: int, short: int) -> None:
    plan = plan_hosted(pending=pending, local_in_flight=local, hosted_in_flight=hosted,
                       left_s=left, margin=0.2, local_pace=pace, hosted_latency_s=2.0,
                       hosted_slots=8, tick_s=0.5, reserve_s=2.5)
    assert (plan.send, plan.shortfall) == (send, short)


def test_plan_hosted_counts_the_hosted_latency() -> None:
    """Slower hosted lines need more in flight: with 2 s lines hosted can still do 8 x 39
    after the next tick, more than the need of 64, so only the even share goes (1 line);
    with 10 s lines only 8 x 7: 8 lines go now."""
    args = dict(pending=220, local_in_flight=4, hosted_in_flight=0, left_s=100.0, margin=0.2,
                local_pace=2.0, hosted_slots=8, tick_s=0.5, reserve_s=2.5)
    assert plan_hosted(hosted_latency_s=2.0, **args).send == 1  # type: ignore[arg-type]
    slow = plan_hosted(hosted_latency_s=10.0, **args)  # type: ignore[arg-type]
    assert slow.send == 8 and slow.shortfall == 0


def _paced(lines: int, window: float, pace: float, *, slowdown: float = 0.0,
           latency: float = 2.0, slots: int = 8,
           measured: bool = False) -> tuple[int, int, float | None, int, float | None]:
    """A batch on a fake clock, ticks of 0.5 s: the engine finishes `pace` lines a second,
    less `slowdown` of it for each hosted call in flight (hosted calls sharing the
    machine's cores, as in scripts/bench_batch.py); hosted runs `slots` calls of `latency`
    at once. The plan sees the pace the scheduler would: `pace` itself, or (`measured`)
    the PaceMeter's. -> lines local, hosted, when done (None: expired), the most hosted
    calls in flight at once, when the first went."""
    tick = 0.5
    meter = PaceMeter(30.0)
    meter.started(0.0)
    pending, local, hosted_done, owed, most = lines, 0, 0, 0.0, 0
    hosted: list[float] = []
    first = None
    t = 0.0
    while t < window + 30:
        hosted_done += sum(1 for end in hosted if end <= t)
        hosted = [end for end in hosted if end > t]
        if pending == 0 and not hosted:
            return local, hosted_done, (t if t <= window else None), most, first
        owed += pace * max(0.2, 1 - slowdown * len(hosted)) * tick
        take = min(pending, int(owed))
        owed -= take
        pending -= take
        local += take
        for _ in range(take):
            meter.finished(t)
        plan = plan_hosted(pending=pending, local_in_flight=0, hosted_in_flight=len(hosted),
                           left_s=window - t, margin=0.2,
                           local_pace=(meter.pace(t, min(10.0, 0.1 * window)) if measured
                                       else pace),
                           hosted_latency_s=latency, hosted_slots=slots, tick_s=tick,
                           reserve_s=latency + tick)
        assert plan.send <= slots - len(hosted)
        if plan.send and first is None:
            first = t
        pending -= plan.send
        hosted += [t + latency] * plan.send
        most = max(most, len(hosted))
        t += tick
    return local, hosted_done, None, most, first


def test_continuous_control_sends_only_what_local_cannot_finish() -> None:
    """1,000 lines, 180 s, the engine finishing 4 lines a second, hosted 8 at once at 2 s a
    line. The plan, re-evaluated each tick, sends hosted only about the lines local
    cannot finish (1,000 - 4 x 180 = 280; the reserve of one hosted round costs a few
    more), spread over the window from the start: a few calls in flight, never all 8,
    and the batch is done before its deadline."""
    local, hosted, done, most, first = _paced(1000, 180.0, 4.0)
    assert done is not None and done <= 180 - 2 and local + hosted == 1000
    assert 280 <= hosted <= 300, hosted
    assert first == 0.0 and most <= 5, (first, most)


def test_a_local_pace_that_falls_once_hosted_starts_still_makes_the_deadline() -> None:
    """The published bench's failure (README, Batch API benchmark): 2,034 lines in 150 s,
    the engine at 12 lines a second, hosted lines of 1.7 s at up to 32 at once, and every
    hosted call in flight taking 1.25% of the engine's pace (they share 2 cores). The
    latest safe start waited until 130 s, then ran 32 at once, the engine slowed to 60%,
    and the batch ended past its deadline (151 s). Spread evenly from the first
    measured pace, hosted holds about 11 calls in flight, the engine keeps most of its
    pace, and the batch ends in time; with no slowdown it sends no more than local
    leaves (255 lines either way)."""
    local, hosted, done, most, _ = _paced(2034, 150.0, 12.0, slowdown=0.0125, latency=1.7,
                                          slots=32, measured=True)
    assert done is not None and local + hosted == 2034, (local, hosted, done)
    assert most <= 12, most
    calm = _paced(2034, 150.0, 12.0, latency=1.7, slots=32, measured=True)
    assert calm[2] is not None and calm[1] <= 260, calm


def test_pace_meter_smooths_over_its_window() -> None:
    m = PaceMeter(window_s=10.0)
    assert m.pace(0.0, warmup_s=2.0) is None  # nothing started
    m.started(0.0)
    assert m.pace(1.0, warmup_s=2.0) is None  # warming up, nothing finished
    early = PaceMeter(window_s=10.0)
    early.started(0.0)
    early.finished(0.3)
    assert early.pace(0.5, warmup_s=2.0) is None  # one line in 0.5 s is no pace yet
    assert m.pace(3.0, warmup_s=2.0) == 0.0  # warmed up: nothing finished is a pace of 0
    for i in range(20):
        m.finished(1.0 + i * 0.5)  # 2 a second from t=1 to t=10.5
    assert m.pace(10.5, warmup_s=2.0) == pytest.approx(20 / 10.0)
    # 5 s without a line: the window (5.5 to 15.5) holds 11 of them.
    assert m.pace(15.5, warmup_s=2.0) == pytest.approx(11 / 10.0)


def _ctl(**over: float) -> BatchConcurrency:
    # The tables below are AIMD's additive phase; slow start has its own test.
    params: dict[str, float] = dict(slo_s=1.0, cut_at=0.7, grow_below=0.5, decrease=0.5,
                                    increase_per_s=1.0, floor=1.0, cooldown_s=1.0,
                                    hold_s=2.0, percentile=0.9, window_s=5.0,
                                    min_samples=10, slow_start=False)
    params.update(over)
    return BatchConcurrency(Aimd(**params))  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "q", "got"), [
    ([0.1] * 9 + [5.0], 0.9, 0.1),        # one outlier in 10 is never the p90
    ([0.1] * 8 + [5.0, 5.0], 0.9, 5.0),   # two are
    ([0.3, 0.1, 0.2], 0.5, 0.2),
    ([0.4], 0.9, 0.4),
])
def test_quantile_is_nearest_rank(values: list[float], q: float, got: float) -> None:
    assert quantile(values, q) == got


# time, local interactive TTFTs seen since the previous step (all at that time), engine
# queueing, limit in use, ceiling -> the limit after the step
AIMD_STEPS: list[tuple[float, list[float], bool, bool, float, float]] = [
    (0.0, [], False, True, 16, 1.0),              # the first step only sets the clock
    (1.0, [], False, True, 16, 2.0),              # no interactive traffic: +1 a second
    (2.0, [0.2] * 10, False, True, 16, 3.0),      # p90 well inside the SLO: grows
    (3.0, [0.2] * 5, False, False, 16, 3.0),      # the limit not in use: no growth
    # One request at 3 s among 19 fast ones: the p90 is 0.2, no cut (the old controller
    # halved on it), and it grows.
    (4.0, [0.2] * 4 + [3.0], False, True, 16, 4.0),
    (5.0, [0.6] * 20, False, True, 16, 4.0),      # p90 between half and 0.7: holds
    # A sustained rise: most of the last 5 s's requests near the SLO. Halved at once.
    (6.0, [0.8] * 10, False, True, 16, 2.0),
    # Within the cooldown, and only 5 TTFTs seen since the cut (too few to judge): kept.
    (6.5, [0.9] * 5, False, True, 16, 2.0),
    (7.5, [0.9] * 5, False, True, 16, 1.0),       # 10 since the cut, still hot: halved again
    # Recovers: fast again, 10 since the cut, but within 2 s of it: held...
    (8.5, [0.1] * 10, False, True, 16, 1.0),
    (10.5, [0.1] * 10, False, True, 16, 2.0),     # ...then grows from 9.5 on
    (11.5, [], True, True, 16, 1.0),              # requests queue at the engine: cut
    (17.5, [], False, True, 16, 5.0),             # from 13.5 on
    (21.5, [], False, True, 4, 4.0),              # the ceiling bounds it
]


def test_batch_concurrency_cuts_on_a_percentile_not_an_outlier() -> None:
    ctl = _ctl()
    for now, ttfts, queued, in_use, ceiling, limit in AIMD_STEPS:
        for t in ttfts:
            ctl.observe(now - 0.01, t)
        got = ctl.step(now, queued=queued, in_use=in_use, ceiling=ceiling)
        assert got == pytest.approx(limit), (now, ttfts, queued)
    assert ctl.cuts == 3
    assert ctl.allowed == 4


def test_few_interactive_requests_never_cut_and_a_slow_one_holds_growth() -> None:
    """Below min_samples nothing is a percentile: one slow request out of three does not
    cut, but the limit does not grow past it either; fast ones alone let it grow."""
    ctl = _ctl()
    ctl.step(0.0, queued=False, in_use=True, ceiling=16)
    for t in (0.1, 0.9, 0.1):
        ctl.observe(0.5, t)
    assert ctl.step(1.0, queued=False, in_use=True, ceiling=16) == 1.0
    assert ctl.cuts == 0 and ctl.signal is None
    # The slow one leaves the 5 s window: the two fast ones left let it grow.
    assert ctl.step(6.0, queued=False, in_use=True, ceiling=16) == pytest.approx(6.0)


def test_old_ttfts_leave_the_window() -> None:
    ctl = _ctl()
    ctl.step(0.0, queued=False, in_use=True, ceiling=16)
    for _ in range(10):
        ctl.observe(0.5, 0.9)
    # Seen 6 s ago: outside the 5 s window, no cut.
    assert ctl.step(6.5, queued=False, in_use=True, ceiling=16) == pytest.approx(7.5)
    assert ctl.cuts == 0


# time, p90 TTFT of 10 requests seen (None: none), at risk, in use -> limit, deadline floor
# (ceiling 8, rising 2 lines a second, falling 0.5)
FLOOR_STEPS: list[tuple[float, float | None, bool, bool, float, float]] = [
    (0.0, None, False, True, 1.0, 0.0),
    (3.0, None, False, True, 4.0, 0.0),
    (4.0, 0.8, False, True, 2.0, 0.0),    # hot: halved
    # At risk: the floor starts from the limit in use and rises 2 a second; hot TTFTs
    # cut the limit, but not below the floor.
    (5.0, 0.8, True, True, 4.0, 4.0),
    (6.0, 0.8, True, True, 6.0, 6.0),
    (7.0, 0.8, True, False, 6.0, 6.0),    # not in use (batch_below's line): held
    (8.0, 0.8, True, True, 8.0, 8.0),
    (9.0, 0.8, True, True, 8.0, 8.0),     # the ceiling bounds it
    # No longer at risk: the floor falls 0.5 a second and the cuts follow it down.
    (11.0, 0.8, False, True, 7.0, 7.0),
    (12.0, 0.8, False, True, 6.5, 6.5),
    (26.0, 0.8, False, True, 3.25, 0.0),  # the floor gone: AIMD alone halves it
]


def test_a_deadline_at_risk_raises_the_floor() -> None:
    ctl = _ctl(hold_s=0.0)
    for now, p90, at_risk, in_use, limit, floor in FLOOR_STEPS:
        if p90 is not None:
            for _ in range(10):
                ctl.observe(now - 0.01, p90)
        got = ctl.step(now, queued=False, in_use=in_use, ceiling=8, at_risk=at_risk)
        assert (got, ctl.deadline_floor) == pytest.approx((limit, floor)), now


def test_slow_start_doubles_until_the_first_cut_then_grows_additively() -> None:
    ctl = _ctl(slow_start=True, hold_s=0.0)
    limits = []
    for now in (0.0, 1.0, 2.0, 3.0, 4.0):
        limits.append(ctl.step(now, queued=False, in_use=True, ceiling=32))
    assert limits == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0])
    assert ctl.step(4.5, queued=False, in_use=False, ceiling=32) == pytest.approx(16.0)
    assert ctl.step(6.0, queued=False, in_use=True, ceiling=32) == pytest.approx(32.0)  # capped
    assert ctl.step(7.0, queued=True, in_use=True, ceiling=32) == pytest.approx(16.0)  # a cut
    # After the first cut: one line a second, as AIMD.
    assert ctl.step(8.0, queued=False, in_use=True, ceiling=32) == pytest.approx(17.0)
    assert ctl.step(10.0, queued=False, in_use=True, ceiling=32) == pytest.approx(19.0)
    assert Aimd(slo_s=1.0).slow_start  # the scheduler's default


def test_batch_concurrency_allows_whole_lines() -> None:
    ctl = _ctl()
    ctl.step(0.0, queued=False, in_use=True, ceiling=16)
    ctl.step(1.5, queued=False, in_use=True, ceiling=16)
    assert ctl.limit == pytest.approx(2.5) and ctl.allowed == 2


def _simulate(lines: int, window: float, *, deadline_acts: bool, hosted_slots: int,
              hosted_latency_s: float = 2.0) -> tuple[int, int, float | None]:
    """A batch on a fake clock, ticks of 0.5 s. The engine finishes 0.8 batch lines a
    second per line in flight, at most 5 in flight (routing's batch_below line). Its
    interactive requests (10 a second) see a TTFT of 0.3 s + 0.1 s per batch line in
    flight: at 2 lines it is half the 1 s SLO (no growth), at 4 it reaches 0.7 of it (a
    cut), so AIMD alone holds the batch at 2 lines, 1.6 a second. Hosted runs
    `hosted_slots` calls of `hosted_latency_s` at once.
    `deadline_acts`: the scheduler passes the plan's projected miss to the controller (the
    new rule); otherwise only flags it (the old). -> lines done locally, hosted, and when
    the batch finished (None: expired at its deadline)."""
    tick, per_slot, cap = 0.5, 0.8, 5
    ctl = _ctl()
    pace = PaceMeter(30.0)
    pace.started(0.0)
    pending, local_done, hosted_done, owed = lines, 0, 0, 0.0
    hosted: list[float] = []
    at_risk, slack = False, True
    t = 0.0
    while t < window:
        done_now = [end for end in hosted if end <= t]
        hosted = [end for end in hosted if end > t]
        hosted_done += len(done_now)
        if pending == 0 and not hosted:
            return local_done, hosted_done, t
        ctl.step(t, queued=False, in_use=True, ceiling=16,
                 at_risk=at_risk and deadline_acts, slack=slack)
        in_flight = min(ctl.allowed, cap, pending)
        for _ in range(int(10 * tick)):
            ctl.observe(t, 0.3 + 0.1 * in_flight)
        owed += in_flight * per_slot * tick
        finished = min(pending, int(owed))
        owed -= finished
        pending -= finished
        local_done += finished
        for _ in range(finished):
            pace.finished(t)
        plan = plan_hosted(pending=pending, local_in_flight=0, hosted_in_flight=len(hosted),
                           left_s=window - t, margin=0.2,
                           local_pace=pace.pace(t, min(10.0, 0.1 * window)),
                           hosted_latency_s=hosted_latency_s, hosted_slots=hosted_slots,
                           tick_s=tick, reserve_s=hosted_latency_s + tick)
        at_risk, slack = plan.shortfall > 0, plan.need <= 0
        pending -= plan.send
        hosted += [t + hosted_latency_s] * plan.send
        t += tick
    return local_done, hosted_done, None


def test_an_at_risk_batch_finishes_by_its_deadline_where_the_old_rule_expired() -> None:
    """600 lines in 100 s, hosted lines of 2 s. The old rule (AIMD held at 2 lines by the
    interactive TTFTs, the projected miss only flagged, hosted at 8 calls at once)
    expires. Each of the new rules finishes in time: the floor raised while the miss is
    projected (even at 8 hosted calls, with more lines local), and hosted at the new default
    of 32 calls (which takes the rest before any miss is projected)."""
    old = _simulate(600, 100.0, deadline_acts=False, hosted_slots=8)
    assert old[2] is None and sum(old[:2]) < 600, old
    floor = _simulate(600, 100.0, deadline_acts=True, hosted_slots=8)
    assert floor[2] is not None and floor[2] <= 100.0 and sum(floor[:2]) == 600, floor
    assert floor[0] > 2 * old[0], (floor, old)  # the local engine ran more of it
    assert Batches().hosted_concurrency == 32
    wide = _simulate(600, 100.0, deadline_acts=True, hosted_slots=32)
    assert wide[2] is not None and wide[2] <= 100.0 and sum(wide[:2]) == 600, wide


def test_an_onprem_batch_at_risk_finishes_locally_by_raising_the_floor() -> None:
    """No hosted at all (an on-prem caller): 320 lines in 100 s, twice what AIMD's 2
    lines (1.6 a second) finish; the floor raised to batch_below's 5 lines (4 a
    second) finishes them in time, and only because it was raised."""
    old = _simulate(320, 100.0, deadline_acts=False, hosted_slots=0)
    assert old[2] is None and old[0] < 320, old
    new = _simulate(320, 100.0, deadline_acts=True, hosted_slots=0)
    assert new == (320, 0, new[2]) and new[2] is not None and new[2] <= 100.0, new
