"""Retries and circuit breakers: when to try an upstream again, and when to stop trying it.

Pure bookkeeping: no I/O, no asyncio, and the clock and the random source are handed in,
so every decision is reproducible in a table test.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import random
import re
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from router.config import Routing

State = Literal["closed", "open", "half-open"]
Clock = Callable[[], float]

# RFC 9110 allows whole seconds only; some upstreams send fractions, none sends signs or exponents
# (and float() alone would also take "nan", "inf" and "1_0").
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
# The doubling reaches any sane backoff_max_s long before this; bounding it keeps the float finite.
_MAX_DOUBLINGS = 64


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); None if unusable.

    `now_wall` is wall-clock time (time.time()), since an HTTP-date names an absolute instant.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # A "-0000" zone parses as naive; HTTP-dates are GMT by definition.
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now_wall)


# How providers say that a 429 concerns the request itself (too many tokens for the
# per-minute limit: OpenAI's "Request too large for ... on tokens per min (TPM)", Anthropic's
# request_too_large), not the traffic: it fails every time, however long one waits.
_TOO_LARGE_CODES = frozenset({"request_too_large", "tokens_too_large", "payload_too_large",
                              "context_length_exceeded", "string_above_max_length"})
_TOO_LARGE_TEXT = re.compile(r"request (?:is )?too large|too large for|must be reduced|"
                             r"exceeds? (?:the )?(?:maximum|max) (?:request|token)",
                             re.IGNORECASE)


def request_too_large(body: bytes) -> bool:
    """Whether a 429's body blames the request's size rather than the rate of requests."""
    text = body[:4096].decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return bool(_TOO_LARGE_TEXT.search(text))
    error = data.get("error") if isinstance(data, dict) else None
    fields = error if isinstance(error, dict) else data if isinstance(data, dict) else {}
    for key in ("code", "type"):
        if isinstance(fields.get(key), str) and fields[key].lower() in _TOO_LARGE_CODES:
            return True
    message = fields.get("message", error if isinstance(error, str) else None)
    return isinstance(message, str) and bool(_TOO_LARGE_TEXT.search(message))


class RetryPolicy:
    """How often one target is retried, and how long to pause between its attempts."""

    __slots__ = ("_rng", "attempts_per_target", "backoff_initial_s", "backoff_max_s",
                 "retry_after_cap_s")

    def __init__(self, attempts_per_target: int, backoff_initial_s: float, backoff_max_s: float,
                 retry_after_cap_s: float, rng: Callable[[], float] = random.random) -> None:
        if attempts_per_target < 1:
            raise ValueError("attempts_per_target must be >= 1")
        if min(backoff_initial_s, backoff_max_s, retry_after_cap_s) < 0:
            raise ValueError("backoff and Retry-After bounds must be >= 0")
        self.attempts_per_target = attempts_per_target
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self._rng = rng

    @classmethod
    def from_routing(cls, routing: Routing, rng: Callable[[], float] = random.random
                     ) -> RetryPolicy:
        return cls(routing.attempts_per_target, routing.backoff_initial_s, routing.backoff_max_s,
                   routing.retry_after_cap_s, rng)

    def delay(self, failures: int, retry_after_s: float | None = None) -> float | None:
        """The pause before the next attempt on the same target; None means go to the next one.

        `failures` counts the failed attempts on this target so far (>= 1).
        """
        if failures < 1:
            raise ValueError("delay() is asked after at least one failure")
        if failures >= self.attempts_per_target:
            return None
        if retry_after_s is not None and retry_after_s > self.retry_after_cap_s:
            # Another target now beats sitting out a long rate limit on this one.
            return None
        ceiling = min(self.backoff_max_s,
                      self.backoff_initial_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
        # Full jitter: callers that failed together spread out over the whole window
        # instead of coming back in lockstep.
        backoff = self._rng() * ceiling
        if retry_after_s is None:
            return backoff
        return max(max(0.0, retry_after_s), backoff)


class CircuitBreaker:
    """Per-upstream breaker: stop sending to an upstream that keeps failing, probe it later.

    closed -> open after `failures_to_open` consecutive failures, or at once on a rate limit;
    open -> half-open when the cool-down has passed, where one probe decides: success closes,
    failure reopens for a fresh cool-down.
    """

    __slots__ = ("_clock", "_failures", "_open_until", "_probe_out", "cooldown_s",
                 "failures_to_open")

    def __init__(self, failures_to_open: int, cooldown_s: float,
                 clock: Clock = time.monotonic) -> None:
        if failures_to_open < 1:
            raise ValueError("failures_to_open must be >= 1")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be > 0")
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None  # None while closed
        self._probe_out = False

    def _state_at(self, now: float) -> State:
        if self._open_until is None:
            return "closed"
        return "open" if now < self._open_until else "half-open"

    @property
    def state(self) -> State:
        return self._state_at(self._clock())

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def available(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half-open" and not self._probe_out)

    def allow(self) -> bool:
        """Called right before an attempt; in half-open only the first caller gets through."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probe_out:
            return False
        self._probe_out = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._open_until = None
        self._probe_out = False

    def failure(self, retry_after_s: float | None = None) -> None:
        """Record a failed attempt; `retry_after_s` comes from a rate-limit response."""
        now = self._clock()
        state = self._state_at(now)
        self._failures += 1
        self._probe_out = False
        if retry_after_s is not None:
            # A rate limit says outright that more requests are unwelcome: no need to count.
            until = now + max(self.cooldown_s, retry_after_s)
            # Answers arrive out of order; an earlier, longer limit still stands.
            self._open_until = until if self._open_until is None else max(self._open_until, until)
        elif state == "half-open" or (
                state == "closed" and self._failures >= self.failures_to_open):
            # Half-open: the upstream still fails, so it gets a fresh cool-down, not the old one.
            self._open_until = now + self.cooldown_s
        # Open: a failure of an attempt sent before it opened tells nothing new.

    def release(self) -> None:
        """The attempt ended without a verdict (e.g. the caller left): let another probe go."""
        self._probe_out = False

    def retry_after_s(self) -> int:
        """retry_in() as a Retry-After header carries it (whole seconds, rounded up), and as
        every message that names the wait says it."""
        return math.ceil(self.retry_in())

    def retry_in(self) -> float:
        now = self._clock()
        if self._state_at(now) == "open" and self._open_until is not None:
            return self._open_until - now
        # Closed, or half-open: whether or not a probe is out, there is no wait left to count.
        return 0.0

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state, "consecutive_failures": self._failures,
                "retry_in_s": round(self.retry_in(), 3)}


def replica_name(deployment: str, replica: str) -> str:
    """How /status, /readyz, metrics and the breakers name one replica of a deployment."""
    return f"{deployment}@{replica}"


class Breakers:
    """One breaker per upstream name, created on first use, all sharing one configuration.

    The engine replicas of a discovered deployment have one each too, named
    `deployment@address:port` (replica_name): a replica that answers its health probe but
    fails requests (5xx, resets, timeouts) is left for its siblings until a probe request
    succeeds, like a hosted upstream. They come and go with the replicas DNS answers."""

    __slots__ = ("_breakers", "_clock", "_replicas", "cooldown_s", "failures_to_open")

    def __init__(self, failures_to_open: int, cooldown_s: float,
                 clock: Clock = time.monotonic) -> None:
        # Fail at construction rather than on the first request that names an upstream.
        CircuitBreaker(failures_to_open, cooldown_s, clock)
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        # deployment -> the replica names among _breakers (a hosted name may hold an "@").
        self._replicas: dict[str, set[str]] = {}

    @classmethod
    def from_routing(cls, routing: Routing, clock: Clock = time.monotonic) -> Breakers:
        return cls(routing.breaker_failures, routing.breaker_cooldown_s, clock)

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(self.failures_to_open, self.cooldown_s, self._clock)
            self._breakers[name] = breaker
        return breaker

    def find(self, name: str) -> CircuitBreaker | None:
        """The breaker of `name` if it has one (get() creates it)."""
        return self._breakers.get(name)

    def replica(self, deployment: str, replica: str) -> CircuitBreaker:
        """The breaker of one replica ("address:port") of a discovered deployment."""
        name = replica_name(deployment, replica)
        self._replicas.setdefault(deployment, set()).add(name)
        return self.get(name)

    def replica_deployments(self) -> set[str]:
        return set(self._replicas)

    def drop_replicas(self, deployment: str, keep: Collection[str] = ()) -> None:
        """Forget the breakers of a deployment's replicas other than `keep` (the replicas
        DNS still answers): a replica that comes back later starts closed."""
        names = self._replicas.get(deployment, set())
        kept = {replica_name(deployment, r) for r in keep}
        for name in names - kept:
            self._breakers.pop(name, None)
        names &= kept
        if not names:
            self._replicas.pop(deployment, None)

    def replicas_unavailable(self, deployment: str) -> dict[str, str]:
        """Why each replica ("address:port") of `deployment` may not be sent to now."""
        prefix = replica_name(deployment, "")
        return {name.removeprefix(prefix): why
                for name in self._replicas.get(deployment, ())
                if (why := _why_unavailable(self._breakers[name])) is not None}

    def unavailable(self) -> dict[str, str]:
        """Why each upstream that may not be tried now is out, for the routing policy."""
        return {name: why for name, breaker in self._breakers.items()
                if (why := _why_unavailable(breaker)) is not None}

    def waits(self) -> dict[str, float]:
        """Seconds until each upstream that may not be tried now may be tried again (a
        half-open one: as soon as its probe ends, so 0)."""
        return {name: b.retry_in() for name, b in self._breakers.items() if not b.available()}

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {name: b.snapshot() for name, b in sorted(self._breakers.items())}


def _why_unavailable(breaker: CircuitBreaker) -> str | None:
    if breaker.available():
        return None
    if breaker.state == "open":
        return f"circuit open, retry in {breaker.retry_after_s()} s"
    return "circuit half-open, probe in flight"
