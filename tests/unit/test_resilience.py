"""Retry-After parsing, retry backoff and circuit breakers, driven by a fake clock and rng."""

from __future__ import annotations

import email.utils

import pytest

from router.config import Routing
from router.routing.resilience import Breakers, CircuitBreaker, RetryPolicy, parse_retry_after
from tests.unit.helpers import Clock

NOW = 1_700_000_000.0  # a wall-clock instant for HTTP-dates


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


# --- Retry-After ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("2", 2.0),
    ("0", 0.0),
    ("0.5", 0.5),
    (" 7 ", 7.0),
    ("120", 120.0),
    (http_date(NOW + 30), 30.0),
    (http_date(NOW - 30), 0.0),
    (http_date(NOW), 0.0),
    (email.utils.formatdate(NOW + 10, localtime=False), 10.0),  # "-0000" zone: naive datetime
    ("Wed, 21 Oct 2015 07:28:00 +0200", 0.0),                   # past, explicit offset
    (None, None),
    ("", None),
    ("-1", None),
    ("-0.5", None),
    ("soon", None),
    ("nan", None),
    ("inf", None),
    ("1e3", None),
    ("1_0", None),
    ("2.", None),
    ("Wed, 99 Foo 2015 07:28:00 GMT", None),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


# --- RetryPolicy ------------------------------------------------------------------------------

def policy(rng: float = 1.0, attempts: int = 10, initial: float = 0.25, cap: float = 4.0,
           ra_cap: float = 20.0) -> RetryPolicy:
    return RetryPolicy(attempts, initial, cap, ra_cap, rng=lambda: rng)


@pytest.mark.parametrize(("failures", "expected"), [
    (1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 4.0), (9, 4.0),
])
def test_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert policy(rng=1.0).delay(failures) == expected


@pytest.mark.parametrize(("rng", "failures", "expected"), [
    (0.0, 1, 0.0), (0.0, 5, 0.0), (0.5, 1, 0.125), (0.5, 3, 0.5), (0.5, 8, 2.0), (0.999, 9, 3.996),
])
def test_full_jitter_scales_the_window(rng: float, failures: int, expected: float) -> None:
    assert policy(rng=rng).delay(failures) == pytest.approx(expected)


def test_jitter_stays_within_bounds_with_a_real_rng() -> None:
    import random

    p = RetryPolicy(10, 0.25, 4.0, 20.0, rng=random.Random(7).random)
    for failures in range(1, 10):
        ceiling = min(4.0, 0.25 * 2 ** (failures - 1))
        for _ in range(200):
            d = p.delay(failures)
            assert d is not None and 0.0 <= d <= ceiling


def test_huge_failure_count_does_not_overflow() -> None:
    assert RetryPolicy(10**6, 0.25, 4.0, 20.0, rng=lambda: 1.0).delay(5000) == 4.0


@pytest.mark.parametrize(("attempts", "failures", "expected"), [
    (1, 1, None),
    (2, 1, 0.25),
    (2, 2, None),
    (3, 2, 0.5),
    (3, 3, None),
    (3, 4, None),
])
def test_attempts_exhausted(attempts: int, failures: int, expected: float | None) -> None:
    assert policy(attempts=attempts).delay(failures) == expected


@pytest.mark.parametrize(("rng", "failures", "retry_after", "expected"), [
    (1.0, 1, 3.0, 3.0),      # Retry-After longer than the backoff wins
    (1.0, 5, 1.0, 4.0),      # backoff longer than Retry-After wins
    (0.0, 1, 0.0, 0.0),
    (0.5, 1, 20.0, 20.0),    # exactly at the cap: still waited out
    (0.5, 1, 20.01, None),   # above the cap: move on to the next target
    (0.5, 1, 3600.0, None),
    (0.5, 1, -5.0, 0.125),   # a negative hint never makes a negative pause
])
def test_retry_after(rng: float, failures: int, retry_after: float,
                     expected: float | None) -> None:
    assert policy(rng=rng).delay(failures, retry_after) == expected


def test_retry_after_over_cap_beats_remaining_attempts() -> None:
    assert policy(attempts=5, ra_cap=0.0).delay(1, 0.1) is None


@pytest.mark.parametrize("args", [
    (0, 0.25, 4.0, 20.0), (2, -0.1, 4.0, 20.0), (2, 0.25, -1.0, 20.0), (2, 0.25, 4.0, -1.0),
])
def test_policy_rejects_bad_settings(args: tuple[int, float, float, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(*args)


def test_delay_requires_a_failure() -> None:
    with pytest.raises(ValueError):
        policy().delay(0)


def test_policy_from_routing() -> None:
    r = Routing(attempts_per_target=3, backoff_initial_s=0.1, backoff_max_s=1.0,
                retry_after_cap_s=5.0)
    p = RetryPolicy.from_routing(r, rng=lambda: 1.0)
    assert (p.attempts_per_target, p.backoff_initial_s, p.backoff_max_s,
            p.retry_after_cap_s) == (3, 0.1, 1.0, 5.0)
    assert [p.delay(n) for n in (1, 2, 3)] == [0.1, 0.2, None]
    assert p.delay(1, 6.0) is None


# --- CircuitBreaker ---------------------------------------------------------------------------

@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


def breaker(clock: Clock, n: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    return CircuitBreaker(n, cooldown, clock=clock)


def opened(clock: Clock, n: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    b = breaker(clock, n, cooldown)
    for _ in range(n):
        b.failure()
    return b


def test_new_breaker_is_closed(clock: Clock) -> None:
    b = breaker(clock)
    assert (b.state, b.available(), b.allow(), b.retry_in()) == ("closed", True, True, 0.0)
    assert b.snapshot() == {"state": "closed", "consecutive_failures": 0, "retry_in_s": 0.0}


@pytest.mark.parametrize(("n", "failures", "state"), [
    (1, 1, "open"), (3, 1, "closed"), (3, 2, "closed"), (3, 3, "open"), (3, 5, "open"),
])
def test_opens_after_n_consecutive_failures(clock: Clock, n: int, failures: int,
                                            state: str) -> None:
    b = breaker(clock, n)
    for _ in range(failures):
        b.failure()
    assert b.state == state
    assert b.consecutive_failures == failures
    assert b.available() is (state == "closed")


def test_success_resets_the_count_between_failures(clock: Clock) -> None:
    b = breaker(clock, n=3)
    for _ in range(4):
        b.failure()
        b.failure()
        b.success()
    assert (b.state, b.consecutive_failures) == ("closed", 0)


def test_stays_open_for_the_cool_down(clock: Clock) -> None:
    b = opened(clock)
    for elapsed, state, retry_in in [(0, "open", 10.0), (4, "open", 6.0), (9.9, "open", 0.1),
                                     (10, "half-open", 0.0), (60, "half-open", 0.0)]:
        clock.now = 100.0 + elapsed
        assert b.state == state, elapsed
        assert b.retry_in() == pytest.approx(retry_in), elapsed
        assert b.available() is (state == "half-open"), elapsed
    clock.now = 105.0
    assert b.allow() is False


def test_failures_while_open_do_not_extend(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(5)
    b.failure()  # an attempt sent before the breaker opened
    assert b.retry_in() == pytest.approx(5.0)


def test_reading_state_has_no_side_effect(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(10)
    for _ in range(3):
        assert (b.state, b.available(), b.retry_in()) == ("half-open", True, 0.0)
    assert b.allow() is True


def test_half_open_allows_exactly_one_probe(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(10)
    assert [b.allow() for _ in range(4)] == [True, False, False, False]
    assert (b.state, b.available()) == ("half-open", False)
    clock.advance(100)  # a slow probe holds the slot however long it takes
    assert b.allow() is False


def test_probe_success_closes(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(10)
    assert b.allow()
    b.success()
    assert (b.state, b.consecutive_failures, b.available()) == ("closed", 0, True)
    assert [b.allow() for _ in range(3)] == [True, True, True]


def test_probe_failure_reopens_for_a_fresh_cool_down(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(12)
    assert b.allow()
    clock.advance(1)
    b.failure()
    assert (b.state, b.retry_in()) == ("open", 10.0)
    assert b.allow() is False
    clock.advance(9.5)
    assert (b.state, b.allow()) == ("open", False)
    clock.advance(0.5)
    assert (b.state, b.allow(), b.allow()) == ("half-open", True, False)


def test_release_frees_the_probe_slot(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(10)
    assert b.allow()
    b.release()
    assert (b.state, b.available(), b.consecutive_failures) == ("half-open", True, 3)
    assert [b.allow(), b.allow()] == [True, False]


def test_release_while_closed_changes_nothing(clock: Clock) -> None:
    b = breaker(clock)
    b.failure()
    b.release()
    assert (b.state, b.consecutive_failures, b.allow()) == ("closed", 1, True)


@pytest.mark.parametrize(("retry_after", "retry_in"), [
    (0.0, 10.0),    # the cool-down is the floor
    (2.0, 10.0),
    (10.0, 10.0),
    (30.0, 30.0),
])
def test_rate_limit_opens_at_once(clock: Clock, retry_after: float, retry_in: float) -> None:
    b = breaker(clock, n=3)
    b.failure(retry_after_s=retry_after)
    assert (b.state, b.consecutive_failures, b.available()) == ("open", 1, False)
    assert b.retry_in() == retry_in


@pytest.mark.parametrize(("first", "wait", "second", "retry_in"), [
    (30.0, 5.0, 5.0, 25.0),     # a shorter later limit does not shorten
    (30.0, 5.0, 20.0, 25.0),    # ends sooner than the first: still does not shorten
    (30.0, 5.0, 60.0, 60.0),    # a longer one extends
    (30.0, 0.0, 40.0, 40.0),
])
def test_later_rate_limit_extends_never_shortens(clock: Clock, first: float, wait: float,
                                                 second: float, retry_in: float) -> None:
    b = breaker(clock)
    b.failure(retry_after_s=first)
    clock.advance(wait)
    b.failure(retry_after_s=second)
    assert b.retry_in() == pytest.approx(retry_in)


def test_rate_limit_on_an_open_breaker_extends(clock: Clock) -> None:
    b = opened(clock)
    b.failure(retry_after_s=45.0)
    assert b.retry_in() == 45.0


def test_rate_limited_probe_reopens_for_the_longer_wait(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(10)
    assert b.allow()
    b.failure(retry_after_s=25.0)
    assert (b.state, b.retry_in(), b.available()) == ("open", 25.0, False)


def test_snapshot_while_open(clock: Clock) -> None:
    b = opened(clock)
    clock.advance(6.66666)
    assert b.snapshot() == {"state": "open", "consecutive_failures": 3, "retry_in_s": 3.333}


@pytest.mark.parametrize(("n", "cooldown"), [(0, 10.0), (3, 0.0), (3, -1.0)])
def test_breaker_rejects_bad_settings(n: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(n, cooldown)
    with pytest.raises(ValueError):
        Breakers(n, cooldown)


# --- Breakers ---------------------------------------------------------------------------------

def test_breakers_create_one_per_name(clock: Clock) -> None:
    bs = Breakers(2, 10.0, clock=clock)
    assert bs.get("a") is bs.get("a")
    assert bs.get("a") is not bs.get("b")
    bs.get("a").failure()
    assert bs.get("b").consecutive_failures == 0


def test_unavailable_lists_only_those_not_available(clock: Clock) -> None:
    bs = Breakers(2, 10.0, clock=clock)

    def trip(name: str) -> None:
        bs.get(name).failure()
        bs.get(name).failure()

    bs.get("healthy").success()
    bs.get("flaky").failure()            # one failure: still closed
    trip("down")
    clock.advance(6.8)
    trip("later")
    # Whole seconds rounded up: the number a Retry-After header carries for the same wait.
    assert bs.unavailable() == {"down": "circuit open, retry in 4 s",
                                "later": "circuit open, retry in 10 s"}
    assert bs.waits() == pytest.approx({"down": 3.2, "later": 10.0})
    clock.advance(3.2)                   # "down" is half-open now: available for a probe
    assert bs.unavailable() == {"later": "circuit open, retry in 7 s"}
    assert bs.get("down").allow()        # the probe goes out: nobody else may follow it
    assert bs.unavailable() == {"down": "circuit half-open, probe in flight",
                                "later": "circuit open, retry in 7 s"}
    assert bs.waits() == pytest.approx({"down": 0.0, "later": 6.8})
    bs.get("down").success()
    assert list(bs.unavailable()) == ["later"]


def test_breakers_snapshot(clock: Clock) -> None:
    bs = Breakers(1, 5.0, clock=clock)
    bs.get("z").failure()
    bs.get("a").success()
    assert bs.snapshot() == {
        "a": {"state": "closed", "consecutive_failures": 0, "retry_in_s": 0.0},
        "z": {"state": "open", "consecutive_failures": 1, "retry_in_s": 5.0},
    }


def test_breakers_from_routing(clock: Clock) -> None:
    bs = Breakers.from_routing(Routing(breaker_failures=2, breaker_cooldown_s=3.0), clock=clock)
    b = bs.get("x")
    assert (b.failures_to_open, b.cooldown_s) == (2, 3.0)
    b.failure()
    b.failure()
    assert b.retry_in() == 3.0
