"""The batch scheduler's decisions as tables (router/routing/batch_pacing.py): the hosted
share ("latest safe start" within hosted's concurrency and latency, and the projected
miss of the deadline), the smoothed local pace, and the engines' adaptive batch
concurrency (AIMD on the interactive signal). Fake clocks, no process."""

from __future__ import annotations

import pytest

from router.routing.batch_pacing import (
    Aimd,
    BatchConcurrency,
    Interactive,
    PaceMeter,
    hosted_capacity,
    plan_hosted,
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
    # Local (2 x 80 - 4 = 156) falls 64 lines short of the target, but hosted can still
    # do 8 x 39 after the next tick: held back (the old rule sent them at once).
    (220, 4, 0, 100.0, 2.0, 0, 0),
    # The latest safe start: target 16 s, local 2 x 16 - 4 = 28, need 60; after one
    # more tick hosted could still do 8 x floor(15.5 / 2) = 56: the other 4 go now.
    (88, 4, 0, 20.0, 2.0, 4, 0),
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
    """Slower hosted lines start hosted earlier: with 2 s lines hosted can still do 8 x 39
    after the next tick, more than the need of 64, so nothing goes yet; with 10 s lines
    only 8 x 7: 8 lines go now."""
    args = dict(pending=220, local_in_flight=4, hosted_in_flight=0, left_s=100.0, margin=0.2,
                local_pace=2.0, hosted_slots=8, tick_s=0.5, reserve_s=2.5)
    assert plan_hosted(hosted_latency_s=2.0, **args).send == 0  # type: ignore[arg-type]
    slow = plan_hosted(hosted_latency_s=10.0, **args)  # type: ignore[arg-type]
    assert slow.send == 8 and slow.shortfall == 0


def test_continuous_control_sends_only_what_local_cannot_finish() -> None:
    """A simulated batch on a fake clock: 1,000 lines, 180 s, the engine finishing 4 lines
    a second, hosted 8 at once at 2 s a line. The plan, re-evaluated each tick, sends
    hosted only about the lines local cannot finish (1,000 - 4 x 180 = 280; the reserve
    of one hosted round costs a few more), and late: hosted starts past the first
    minute, the batch is done before its deadline."""
    pace, window, tick = 4.0, 180.0, 0.5
    pending, local_done, hosted_sent = 1000, 0, 0
    hosted_busy: list[float] = []
    first_hosted = None
    t = 0.0
    while t < window and (pending > 0 or hosted_busy):
        hosted_busy = [end for end in hosted_busy if end > t]
        # local: `pace` lines a second while lines are pending
        take = min(pending, int(pace * tick))
        pending -= take
        local_done += take
        plan = plan_hosted(pending=pending, local_in_flight=0,
                           hosted_in_flight=len(hosted_busy), left_s=window - t, margin=0.2,
                           local_pace=pace, hosted_latency_s=2.0, hosted_slots=8,
                           tick_s=tick, reserve_s=2.5)
        assert plan.send <= 8 - len(hosted_busy)
        if plan.send and first_hosted is None:
            first_hosted = t
        pending -= plan.send
        hosted_sent += plan.send
        hosted_busy += [t + 2.0] * plan.send
        t += tick
    assert pending == 0 and not hosted_busy and t <= window - 2
    assert 280 <= hosted_sent <= 300, hosted_sent
    assert first_hosted is not None and first_hosted > 40


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


def _ctl() -> BatchConcurrency:
    return BatchConcurrency(Aimd(slo_s=1.0, cut_at=0.7, grow_below=0.5, decrease=0.5,
                                 increase_per_s=1.0, floor=1.0, cooldown_s=1.0,
                                 hold_s=2.0))


# time, worst interactive TTFT (None: none finished), engine queueing, limit in use,
# ceiling -> the limit after the step
AIMD_STEPS = [
    (0.0, None, False, True, 16, 1.0),     # the first step only sets the clock
    (1.0, None, False, True, 16, 2.0),     # no interactive traffic: +1 a second
    (2.0, 0.2, False, True, 16, 3.0),      # interactive well inside the SLO: grows
    (3.0, 0.2, False, False, 16, 3.0),     # the limit not in use: no growth
    (4.0, 0.6, False, True, 16, 3.0),      # between half and 0.7 of the SLO: holds
    (5.0, 0.75, False, True, 16, 1.5),     # nearing the SLO: halved at once
    (5.5, 0.9, False, True, 16, 1.5),      # within the cooldown (signals lag): kept
    (6.5, 0.9, False, True, 16, 1.0),      # still hot: halved again, held at the floor
    (7.5, 0.1, False, True, 16, 1.0),      # fine again, but within 2 s of the cut: held
    (9.5, 0.1, False, True, 16, 2.0),      # grows from 8.5 on
    (10.5, None, True, True, 16, 1.0),     # requests queue at the engine: cut
    (16.5, None, False, True, 16, 5.0),    # from 12.5 on
    (20.5, None, False, True, 4, 4.0),     # the ceiling bounds it
]


def test_batch_concurrency_aimd_table() -> None:
    ctl = _ctl()
    for now, ttft, queued, in_use, ceiling, limit in AIMD_STEPS:
        got = ctl.step(now, Interactive(ttft, queued), in_use=in_use, ceiling=ceiling)
        assert got == pytest.approx(limit), (now, ttft, queued)
    assert ctl.cuts == 3
    assert ctl.allowed == 4


def test_batch_concurrency_allows_whole_lines() -> None:
    ctl = _ctl()
    ctl.step(0.0, Interactive(None, False), in_use=True, ceiling=16)
    ctl.step(1.5, Interactive(None, False), in_use=True, ceiling=16)
    assert ctl.limit == pytest.approx(2.5) and ctl.allowed == 2
