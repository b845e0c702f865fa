"""Per-caller request and token rates: token buckets that refill continuously.

A bucket holds one minute's allowance and refills at allowance/60 per second, so a caller
may burst up to its per-minute rate and then runs at it. Tokens are charged at admission
with the request's worst case (the prompt's upper bound + n x max_tokens, the default
output bound when it sets none) and trued up when the call ends, so a burst of long
requests cannot slip past the limit before any has finished. A request whose worst case is
over one minute's allowance is refused by the gateway before it gets here
(`tokens_per_minute`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from router.config import RateLimit


class _Bucket:
    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 when it is); amounts over the capacity
        need a full bucket, so one huge request is slow rather than impossible."""
        self._refill(now)
        need = min(amount, self.capacity)
        # The tolerance absorbs float drift: waiting exactly the time returned is enough.
        missing = need - self.level
        return 0.0 if missing <= 1e-9 * max(1.0, need) else missing / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount  # may go negative: the debt is paid back by waiting

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True, slots=True)
class Admission:
    caller: str
    tokens: int
    limiter: RateLimiter  # the one that admitted it: a reload may have replaced it since

    def settle(self, used_tokens: int) -> None:
        self.limiter.settle(self, used_tokens)


class RateLimiter:
    def __init__(self, limits: dict[str, RateLimit],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._requests = {c: _Bucket(r.requests_per_minute, now)
                          for c, r in limits.items() if r.requests_per_minute}
        self._tokens = {c: _Bucket(r.tokens_per_minute, now)
                        for c, r in limits.items() if r.tokens_per_minute}

    def tokens_per_minute(self, caller: str) -> int | None:
        """The caller's per-minute token allowance: the most one request may use."""
        tok = self._tokens.get(caller)
        return None if tok is None else int(tok.capacity)

    def admit(self, caller: str, tokens: int) -> Admission | float:
        """An admission, or the seconds to wait before trying again."""
        now = self._clock()
        req, tok = self._requests.get(caller), self._tokens.get(caller)
        if tok is not None:
            # A huge max_tokens must not sink the bucket for the whole call: one minute's
            # allowance is the most a single request is charged up front.
            tokens = min(tokens, int(tok.capacity))
        wait = max(req.wait_for(1, now) if req else 0.0,
                   tok.wait_for(tokens, now) if tok else 0.0)
        if wait > 0:
            return wait
        if req:
            req.take(1)
        if tok:
            tok.take(tokens)
        return Admission(caller, tokens, self)

    def settle(self, a: Admission, used_tokens: int) -> None:
        tok = self._tokens.get(a.caller)
        if tok is None:
            return
        if used_tokens < a.tokens:
            tok.give(a.tokens - used_tokens)
        else:
            tok.take(used_tokens - a.tokens)

    def inherit(self, old: RateLimiter) -> None:
        """After a reload: what each caller used stays used, as with budgets. A bucket
        whose limit did not change is the same object (so calls admitted before the reload
        settle into it); a changed limit keeps the caller's fill ratio at the new size."""
        now = self._clock()
        for mine, theirs in ((self._requests, old._requests), (self._tokens, old._tokens)):
            for caller, bucket in mine.items():
                prev = theirs.get(caller)
                if prev is None:
                    continue
                if prev.capacity == bucket.capacity:
                    mine[caller] = prev
                else:
                    prev._refill(now)
                    bucket.level = prev.level * bucket.capacity / prev.capacity
                    bucket.stamp = now


class StreamSlots:
    """Streams each caller holds open now, against its policy's cap
    (`max_concurrent_streams`): an admission like the buckets above, kept by the runtime
    across reloads."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def take(self, caller: str, cap: int | None) -> Callable[[], None] | None:
        """A release (idempotent) for one more stream, or None when the caller is at its
        cap."""
        n = self._open.get(caller, 0)
        if cap is not None and n >= cap:
            return None
        self._open[caller] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open[caller] - 1
                if left:
                    self._open[caller] = left
                else:
                    del self._open[caller]

        return release

    def open(self, caller: str) -> int:
        return self._open.get(caller, 0)
