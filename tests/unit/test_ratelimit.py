from __future__ import annotations

import pytest

from router.config import RateLimit
from router.routing.ratelimit import Admission, RateLimiter
from tests.unit.helpers import Clock


def limiter(clock: Clock, **limits: RateLimit) -> RateLimiter:
    return RateLimiter(dict(limits), clock=clock)


def admitted(result: Admission | float) -> Admission:
    assert isinstance(result, Admission), f"refused, wait {result}"
    return result


def refused(result: Admission | float) -> float:
    assert isinstance(result, float), f"admitted: {result}"
    assert result > 0
    return result


# -- requests per minute -------------------------------------------------------------


@pytest.mark.parametrize(("rpm", "wait"), [(1, 60.0), (3, 20.0), (60, 1.0), (120, 0.5)])
def test_requests_burst_then_wait(rpm: int, wait: float) -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(requests_per_minute=rpm))
    for _ in range(rpm):
        a = admitted(rl.admit("app", 0))
        assert (a.caller, a.tokens) == ("app", 0)
    assert refused(rl.admit("app", 0)) == pytest.approx(wait)
    # Waiting exactly what it said is enough, for one request.
    clock.advance(wait)
    admitted(rl.admit("app", 0))
    assert refused(rl.admit("app", 0)) == pytest.approx(wait)


def test_waiting_the_returned_time_is_enough() -> None:
    clock = Clock(1000.0)
    rl = limiter(clock, app=RateLimit(requests_per_minute=7))
    for _ in range(7):
        admitted(rl.admit("app", 0))
    clock.advance(refused(rl.admit("app", 0)))  # 60/7 s
    admitted(rl.admit("app", 0))


def test_requests_refill_gradually() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(requests_per_minute=60))
    for _ in range(60):
        admitted(rl.admit("app", 0))
    clock.advance(0.25)
    assert refused(rl.admit("app", 0)) == pytest.approx(0.75)
    clock.advance(0.75 + 9.0)  # 10 s: ten requests' worth
    for _ in range(10):
        admitted(rl.admit("app", 0))
    assert refused(rl.admit("app", 0)) == pytest.approx(1.0)


def test_refill_is_capped_at_one_minute_of_allowance() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(requests_per_minute=5))
    clock.advance(3600)  # an idle hour does not bank an hour of requests
    for _ in range(5):
        admitted(rl.admit("app", 0))
    assert refused(rl.admit("app", 0)) == pytest.approx(12.0)


# -- tokens per minute ---------------------------------------------------------------


def test_tokens_charged_at_admission() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=1000))
    a = admitted(rl.admit("app", 600))
    assert a.tokens == 600
    # 400 left; 600 more needs 200 at 1000/60 per second.
    assert refused(rl.admit("app", 600)) == pytest.approx(12.0)
    admitted(rl.admit("app", 400))
    assert refused(rl.admit("app", 1)) == pytest.approx(0.06)


def test_settle_refunds_unused_tokens() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=1000))
    a = admitted(rl.admit("app", 600))
    refused(rl.admit("app", 600))
    a.settle(100)  # 500 back: 900 available
    admitted(rl.admit("app", 900))
    assert refused(rl.admit("app", 60)) == pytest.approx(3.6)


def test_settle_charges_tokens_used_beyond_the_estimate() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=1000))
    a = admitted(rl.admit("app", 100))
    rl.settle(a, 700)  # 600 more than admitted: 300 left
    admitted(rl.admit("app", 300))
    assert refused(rl.admit("app", 100)) == pytest.approx(6.0)


def test_settle_exact_changes_nothing() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=1000))
    admitted(rl.admit("app", 250)).settle(250)
    admitted(rl.admit("app", 750))
    assert refused(rl.admit("app", 1)) == pytest.approx(0.06)


def test_refund_is_capped_at_capacity() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=1000))
    a = admitted(rl.admit("app", 500))
    clock.advance(60)  # full again
    a.settle(0)  # the refund must not lift the bucket over one minute's allowance
    admitted(rl.admit("app", 1000))
    assert refused(rl.admit("app", 1)) == pytest.approx(0.06)


def test_overspend_is_a_debt_paid_by_waiting() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=600))  # 10 per second
    admitted(rl.admit("app", 100)).settle(800)  # level 500 - 700 = -200
    assert refused(rl.admit("app", 100)) == pytest.approx(30.0)
    clock.advance(30.0)
    admitted(rl.admit("app", 100))


def test_request_over_capacity_waits_for_a_full_bucket() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=100))  # 100/60 per second
    admitted(rl.admit("app", 50))
    # 250 > capacity: it needs the bucket full (100), not 250 tokens that never fit.
    assert refused(rl.admit("app", 250)) == pytest.approx(30.0)
    clock.advance(30.0)
    big = admitted(rl.admit("app", 250))
    # Up front it is charged one minute's allowance at most (a max_tokens of 2**63 must
    # not sink the bucket for the whole call): the next 10 tokens wait for 10.
    assert refused(rl.admit("app", 10)) == pytest.approx(6.0)
    # What it really used is charged when it ends: a debt of 150, so 10 wait for 160.
    big.settle(250)
    assert refused(rl.admit("app", 10)) == pytest.approx(96.0)


def test_huge_request_on_a_full_bucket_is_admitted_at_once() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=100))
    admitted(rl.admit("app", 10_000))


# -- both limits ---------------------------------------------------------------------


def test_wait_is_the_longer_of_both_limits() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(requests_per_minute=1, tokens_per_minute=60))
    admitted(rl.admit("app", 60))
    # requests: 60 s for one; tokens: 30 s for 30.
    assert refused(rl.admit("app", 30)) == pytest.approx(60.0)


def test_refused_request_charges_nothing() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(requests_per_minute=2, tokens_per_minute=100))
    admitted(rl.admit("app", 80))
    refused(rl.admit("app", 80))  # tokens short: must not take a request slot
    admitted(rl.admit("app", 10))  # the second request slot, 10 of the 20 tokens left
    assert refused(rl.admit("app", 1)) == pytest.approx(30.0)  # the request bucket's wait


def test_token_refusal_leaves_tokens_untouched() -> None:
    clock = Clock()
    rl = limiter(clock, app=RateLimit(tokens_per_minute=60))
    admitted(rl.admit("app", 50))
    for _ in range(3):
        assert refused(rl.admit("app", 20)) == pytest.approx(10.0)
    admitted(rl.admit("app", 10))


# -- callers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits",
    [{}, {"app": RateLimit()}, {"other": RateLimit(requests_per_minute=1, tokens_per_minute=1)}],
)
def test_caller_without_limits_is_always_admitted(limits: dict[str, RateLimit]) -> None:
    rl = RateLimiter(limits, clock=Clock())
    for _ in range(1000):
        a = admitted(rl.admit("app", 1_000_000))
        a.settle(5_000_000)  # no bucket: nothing to true up


def test_callers_are_independent() -> None:
    clock = Clock()
    limit = RateLimit(requests_per_minute=2, tokens_per_minute=100)
    rl = limiter(clock, app=limit, batch=limit)
    admitted(rl.admit("app", 50))
    admitted(rl.admit("app", 50))
    refused(rl.admit("app", 1))
    admitted(rl.admit("batch", 100))
    a = admitted(rl.admit("batch", 0))
    refused(rl.admit("batch", 0))
    a.settle(1000)  # batch's debt stays with batch
    clock.advance(30)
    admitted(rl.admit("app", 50))
    assert refused(rl.admit("batch", 0)) == pytest.approx(570.0)


def test_only_the_configured_limit_applies() -> None:
    clock = Clock()
    rl = limiter(clock, reqs=RateLimit(requests_per_minute=1),
                 toks=RateLimit(tokens_per_minute=10))
    admitted(rl.admit("reqs", 1_000_000))
    refused(rl.admit("reqs", 0))
    for _ in range(10):
        admitted(rl.admit("toks", 1))
    refused(rl.admit("toks", 1))


def test_admission_settles_with_the_limiter_that_admitted_it() -> None:
    clock = Clock()
    old = limiter(clock, app=RateLimit(tokens_per_minute=100))
    a = admitted(old.admit("app", 100))
    new = limiter(clock, app=RateLimit(tokens_per_minute=100))  # a reload replaced it
    admitted(new.admit("app", 100))
    a.settle(0)
    assert a.limiter is old
    admitted(old.admit("app", 100))  # refunded
    refused(new.admit("app", 1))  # untouched


def test_default_clock_is_monotonic() -> None:
    rl = RateLimiter({"app": RateLimit(requests_per_minute=1)})
    admitted(rl.admit("app", 0))
    assert 59.0 < refused(rl.admit("app", 0)) <= 60.0


# -- reloads -------------------------------------------------------------------------


def test_reload_keeps_what_each_caller_used() -> None:
    """A reload used to refill every bucket: 201 requests passed in 5.7 s where the limit
    allows 66."""
    clock = Clock()
    old = limiter(clock, app=RateLimit(requests_per_minute=6, tokens_per_minute=100))
    for _ in range(6):
        admitted(old.admit("app", 10))
    refused(old.admit("app", 10))
    new = limiter(clock, app=RateLimit(requests_per_minute=6, tokens_per_minute=100),
                  other=RateLimit(requests_per_minute=1))
    new.inherit(old)
    assert refused(new.admit("app", 10)) == pytest.approx(10.0)  # one request in 10 s
    admitted(new.admit("other", 0))  # a new caller starts full
    clock.advance(10)
    admitted(new.admit("app", 10))
    refused(new.admit("app", 10))


def test_reload_in_flight_admission_settles_into_the_kept_bucket() -> None:
    clock = Clock()
    old = limiter(clock, app=RateLimit(tokens_per_minute=100))
    a = admitted(old.admit("app", 100))
    new = limiter(clock, app=RateLimit(tokens_per_minute=100))
    new.inherit(old)
    refused(new.admit("app", 1))
    a.settle(0)  # the call used nothing: its hold comes back to the caller
    admitted(new.admit("app", 100))


@pytest.mark.parametrize(("before", "after", "left"), [(100, 200, 100.0), (100, 50, 25.0)])
def test_reload_with_a_changed_limit_keeps_the_fill_ratio(before: int, after: int,
                                                          left: float) -> None:
    clock = Clock()
    old = limiter(clock, app=RateLimit(tokens_per_minute=before))
    admitted(old.admit("app", before // 2))
    new = limiter(clock, app=RateLimit(tokens_per_minute=after))
    new.inherit(old)
    admitted(new.admit("app", int(left)))
    refused(new.admit("app", 1))
