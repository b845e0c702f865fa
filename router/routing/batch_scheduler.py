"""Feeds the lines of /v1/batches to the gateway: local engines first, at the pace they
take, and to hosted only the part of the batch the deadline forces.

Every line is one ordinary request through `Gateway.handle`, at the batch class, for the
caller who created the batch: residency, licence, aliases, rate limits and budgets apply
per line exactly as for a single request, and each finished line is one ledger row with
the batch's id.

Local lines go out while a local engine of the alias has headroom below its batch line
(routing decides that per request too), at most `batches.local_concurrency` at once. The
local pace (lines finished a second, measured over the last minute) and the time left say
how many lines local capacity can still finish; the lines beyond that, with
`batches.deadline_margin` held in reserve, are sent hosted (forced hosted, at the batch
class, so billed at the offering's batch price). A caller that may not leave the building
never goes hosted: what local capacity cannot finish by the deadline is reported
`expired`, with the lines that did finish in the output file, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from router.accounting.batches import BATCH_URLS, BatchStore, Line
from router.config import Caller
from router.errors import SpilloverError
from router.routing.auth import ANONYMOUS, Principal

if TYPE_CHECKING:
    from router.config import Config
    from router.routing.catalog import Catalog
    from router.routing.gateway import Gateway
    from router.routing.load import LoadMonitor

log = logging.getLogger("spillover.batches")

_PACE_WINDOW_S = 60.0
_RECOVER_EVERY_S = 30.0
# A status the line is tried again for later rather than failed: the engine or the caller's
# limits were busy for a moment.
_RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Parts:
    """What the scheduler reads of the running gateway; fetched each turn, so a reload's
    fresh parts are used from then on."""

    config: Config
    catalog: Catalog
    monitor: LoadMonitor
    gateway: Gateway


@dataclass
class _Run:
    """One batch being worked on by this process."""

    id: str
    caller: str
    endpoint: str
    deadline: float
    started: float
    local: set[asyncio.Task[None]] = field(default_factory=set)
    hosted: set[asyncio.Task[None]] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)
    done_local: deque[float] = field(default_factory=deque)  # finish times of local lines
    pause_until: float = 0.0


class BatchScheduler:
    def __init__(self, store: BatchStore, parts: Callable[[], Parts],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._parts = parts
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._recovered_at = 0.0

    async def start(self) -> None:
        resumed = await asyncio.to_thread(self.store.recover)
        if resumed:
            log.info("batches: %d lines in flight at the last stop run again", resumed)
        self._task = asyncio.create_task(self._loop(), name="spillover-batches")

    async def stop(self) -> None:
        """Stop feeding; lines in flight are cancelled and go back to pending (the next
        start runs them), finished ones stay finished."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = [t for run in self._runs.values() for t in (*run.local, *run.hosted)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()

    def wake(self) -> None:
        """A batch was created or cancelled: look now rather than at the next poll."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad turn must not end the scheduler
                log.exception("batch scheduler turn failed")
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel of a
            # stop that lands as the event is set, and the loop never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._parts().config.batches.poll_s):
                    await self._wake.wait()

    async def tick(self) -> None:
        """One turn: start, feed, and end the batches in progress."""
        if self.store.shared and self._clock() - self._recovered_at > _RECOVER_EVERY_S:
            # Replicas share the lines: those a dead replica held go back after its lease.
            self._recovered_at = self._clock()
            await asyncio.to_thread(self.store.recover)
        for bid, caller, status, endpoint, created, window_s in await asyncio.to_thread(
                self.store.active):
            run = self._runs.get(bid)
            if run is None:
                run = self._runs[bid] = _Run(bid, caller, endpoint, created + window_s,
                                             self._clock())
            if status == "validating":
                await asyncio.to_thread(self.store.set_status, bid, "in_progress",
                                        only_from=("validating",))
            await self._work(run, status)

    async def _work(self, run: _Run, status: str) -> None:
        parts = self._parts()
        now = self._clock()
        counts = await asyncio.to_thread(self.store.counts, run.id)
        busy = len(run.local) + len(run.hosted)
        if status == "cancelling" or now >= run.deadline or counts["pending"] == 0:
            if busy == 0 and counts["running"] == 0:
                end = ("cancelled" if status == "cancelling"
                       else "completed" if counts["pending"] == 0 else "expired")
                await asyncio.to_thread(self.store.finalize, run.id, end)
                del self._runs[run.id]
                log.info("batch %s %s: %s", run.id, end, counts)
            return
        if now < run.pause_until:
            return
        principal = _principal(parts.config, run.caller)
        if principal is None:
            # The caller was removed from models.yaml: its lines fail, nobody pays for them.
            await self._fail_all(run, "the caller of this batch is no longer configured")
            return
        if not run.aliases:
            await self._learn_alias(run)
        b = parts.config.batches
        # Local: one line at a time while an engine of the batch's aliases has headroom.
        while len(run.local) < b.local_concurrency and self._headroom(parts, run):
            if not await self._spawn(run, principal, "local"):
                break
        if principal.policy.residency == "onprem" or not self._batch_priced(parts, run):
            # Never leaves (or has no hosted batch price to leave at): what cannot finish
            # locally in time expires.
            return
        want = self._hosted_share(run, counts, now, b.deadline_margin)
        while len(run.hosted) < min(want, b.hosted_concurrency):
            if not await self._spawn(run, principal, "hosted"):
                break

    def _hosted_share(self, run: _Run, counts: dict[str, int], now: float,
                      margin: float) -> int:
        """Lines to send hosted now: the pending lines local capacity cannot finish by the
        deadline at the measured pace, keeping `margin` of the time left in reserve."""
        left = run.deadline - now
        pending = counts["pending"] + len(run.local)
        while run.done_local and run.done_local[0] < now - _PACE_WINDOW_S:
            run.done_local.popleft()
        measured_for = min(_PACE_WINDOW_S, now - run.started)
        if not run.done_local and measured_for < min(10.0, 0.1 * (run.deadline - run.started)):
            return 0  # no pace measured yet: give the engines a moment first
        pace = len(run.done_local) / max(measured_for, 1e-3)
        local_can = pace * left * (1 - margin)
        return max(0, int(pending - local_can))

    async def _learn_alias(self, run: _Run) -> None:
        """The alias of the batch's first line, for headroom and hosted checks before any
        line ran (lines of one batch name one model as a rule; others join as they run)."""
        line = await asyncio.to_thread(self.store.first_line, run.id)
        if line is None:
            return
        file_id = await asyncio.to_thread(self.store.input_file, run.id)
        model = (await asyncio.to_thread(self.store.read_line, file_id, line))["body"]["model"]
        if isinstance(model, str):
            run.aliases.add(model)

    def _batch_priced(self, parts: Parts, run: _Run) -> bool:
        """Whether some hosted offering of the batch's aliases takes batch work (routing
        sends batch work hosted only at a batch price)."""
        return any(b.route == "hosted" and b.batch_price is not None
                   for alias in run.aliases for b in parts.catalog.backends(alias) or ())

    def _headroom(self, parts: Parts, run: _Run) -> bool:
        names: list[str] = []
        lines: dict[str, float] = {}
        for alias in run.aliases or parts.catalog.aliases:
            for b in parts.catalog.backends(alias) or ():
                if b.route == "local":
                    names.append(b.name)
                    sat = b.saturation
                    lines[b.name] = getattr(sat, "batch_below", 1.0) if sat else 1.0
        for name, load in parts.monitor.view(names).items():
            if load.healthy and not load.saturated and load.score < lines[name]:
                return True
        return False

    async def _spawn(self, run: _Run, principal: Principal, route: str) -> bool:
        claimed = await asyncio.to_thread(self.store.claim, run.id, 1, route)
        if not claimed:
            return False
        line = claimed[0]
        tasks = run.local if route == "local" else run.hosted
        task = asyncio.create_task(self._run_line(run, principal, line, route),
                                   name=f"spillover-batch-{run.id}-{line.line_no}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return True

    async def _run_line(self, run: _Run, principal: Principal, line: Line,
                        route: str) -> None:
        try:
            file_id = await asyncio.to_thread(self.store.input_file, run.id)
            item = await asyncio.to_thread(self.store.read_line, file_id, line)
            body = item["body"]
            model = body.get("model")
            if isinstance(model, str):
                run.aliases.add(model)
            status, payload, request_id, served = await self._call(
                run, principal, line, body, route)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self.store.release, line))
            raise
        except Exception as exc:
            log.exception("batch %s line %d failed", run.id, line.line_no)
            status, served, request_id = 500, "", f"{run.id}-{line.line_no}"
            payload = orjson.dumps({"error": {"message": f"the line could not be run: "
                                              f"{type(exc).__name__}", "type": "api_error",
                                              "param": None, "code": "batch_line_failed"}})
        if status in _RETRY_STATUSES and self._clock() < run.deadline:
            # Busy for a moment (an engine full, the caller's rate limit): later, again.
            run.pause_until = self._clock() + 1.0
            await asyncio.to_thread(self.store.release, line)
            return
        await asyncio.to_thread(self.store.finish_line, line, ok=status < 400,
                                status_code=status, request_id=request_id, result=payload,
                                route=served)
        if served == "local" and status < 400:
            run.done_local.append(self._clock())
        self.wake()

    async def _call(self, run: _Run, principal: Principal, line: Line, body: dict[str, Any],
                    route: str) -> tuple[int, bytes, str, str]:
        parts = self._parts()
        rid = f"{run.id}-{line.line_no}"
        content = orjson.dumps(body)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(content)).encode()),
                   (b"x-request-id", rid.encode()),
                   (b"x-spillover-route", route.encode())]
        scope = {"type": "http", "method": "POST", "path": run.endpoint, "headers": headers,
                 "query_string": b""}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}

        # The route is the scheduler's decision (local while there is headroom, hosted for
        # what the deadline forces), not the caller's: it may force it on the caller's behalf.
        forced = Principal(principal.name,
                           principal.policy.model_copy(update={"may_force_route": True}))
        endpoint = BATCH_URLS[run.endpoint]
        try:
            response = await parts.gateway.handle(
                endpoint, scope, receive, priority="batch", as_caller=forced,
                batch_id=run.id)
        except SpilloverError as err:  # refused: residency, licence, budget, limits...
            return err.status, orjson.dumps(err.body()), rid, ""
        payload = bytes(response.body)
        return (response.status_code, payload, response.headers.get("x-request-id", rid),
                response.headers.get("x-spillover-route", ""))

    async def _fail_all(self, run: _Run, why: str) -> None:
        payload = orjson.dumps({"error": {"message": why, "type": "invalid_request_error",
                                          "param": None, "code": "caller_not_found"}})
        while lines := await asyncio.to_thread(self.store.claim, run.id, 500, ""):
            for line in lines:
                await asyncio.to_thread(self.store.finish_line, line, ok=False,
                                        status_code=403, request_id="", result=payload,
                                        route="")


def _principal(config: Config, name: str) -> Principal | None:
    if not config.callers:
        return Principal(ANONYMOUS, Caller())
    policy = config.callers.get(name)
    return None if policy is None else Principal(name, policy)
