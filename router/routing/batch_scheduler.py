"""Feeds the lines of /v1/batches to the gateway: local engines first, at the pace they
take, and to hosted only the part of the batch the deadline forces.

Every line is one ordinary request through `Gateway.handle`, at the batch class, for the
caller who created the batch: residency, licence, aliases, rate limits and budgets apply
per line exactly as for a single request, and each finished line is one ledger row with
the batch's id.

Local lines go out while a local engine of the alias has headroom below its batch line
(routing decides that per request too: `saturation.batch_below` is the hard ceiling),
at most as many at once as the engine's adaptive batch concurrency allows: AIMD on what
the router sees of the engine's interactive traffic (the p90 of its local times to first
token over the last seconds against `batches.interactive_ttft_slo_ms`, requests queueing
at the engine), so batch work fills what interactive traffic leaves and backs off fast
when interactive latency suffers, but not for one slow request.

Every tick the smoothed local pace and the time left say how many lines local capacity can
still finish; hosted gets only the rest, and only from the latest tick at which hosted (at
`batches.hosted_concurrency` calls at once, of the hosted latency measured) can still
finish it before the deadline less `batches.deadline_margin` of the time left
(router/routing/batch_pacing.py). Hosted lines go forced hosted, at the batch class, so
billed at the offering's batch price. When even local plus hosted at full concurrency
cannot finish by the deadline, the batch says so (a warning in the log, `spillover` in the
batch object) and the scheduler acts on it: the engines' batch concurrency gets a floor
that rises while the risk lasts (the deadline outranks the margin kept below the
interactive SLO, up to routing's batch line), and hosted has `batches.hosted_concurrency`
slots to take the rest. A caller that may not leave the building never goes hosted: what local
capacity cannot finish by the deadline is reported `expired`, with the lines that did
finish in the output file, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from router.accounting.batches import (
    BATCH_URLS,
    BatchStore,
    Line,
    is_job_token,
    line_request_id,
    new_job_token,
)
from router.accounting.budgets import Budgets, Reservation
from router.accounting.ledger import LedgerRow, StoreUnavailable
from router.config import Caller
from router.errors import SpilloverError
from router.http.inbound import facts_for
from router.providers.base import bound_output
from router.providers.mistral import MistralTranslator
from router.providers.mistral_batch import ENDED, BatchJobError, MistralBatches
from router.routing.auth import ANONYMOUS, Principal
from router.routing.batch_pacing import (
    Aimd,
    BatchConcurrency,
    HostedPlan,
    PaceMeter,
    plan_hosted,
)

if TYPE_CHECKING:
    from router.config import Batches, Config
    from router.routing.call import Call
    from router.routing.catalog import Backend, Catalog
    from router.routing.gateway import Gateway
    from router.routing.load import LoadMonitor

log = logging.getLogger("spillover.batches")

_PACE_WINDOW_S = 30.0
# The hosted latency measured so far weighs this much against each new line's.
_LATENCY_EWMA = 0.2
# A projected miss of the deadline is logged again at most this often per batch.
_WARN_EVERY_S = 30.0
_RECOVER_EVERY_S = 30.0
# A status the line is tried again for later rather than failed: the engine or the caller's
# limits were busy for a moment.
_RETRY_STATUSES = frozenset({429, 503})
# A hosted batch job is polled at the scheduler's pace at first, then less often, up to this.
_JOB_POLL_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Parts:
    """What the scheduler reads of the running gateway; fetched each turn, so a reload's
    fresh parts are used from then on."""

    config: Config
    catalog: Catalog
    monitor: LoadMonitor
    gateway: Gateway
    # For hosted providers' own batch APIs (La Plateforme's batch jobs).
    http: httpx.AsyncClient | None = None
    api_keys: Mapping[str, str | None] = field(default_factory=dict)


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
    pace: PaceMeter = field(default_factory=lambda: PaceMeter(_PACE_WINDOW_S))
    hosted_latency_s: float | None = None  # hosted lines' duration, smoothed (EWMA)
    plan: HostedPlan | None = None  # the last tick's hosted decision
    local_allowed: int = 0  # local lines the engines' batch concurrency allowed last tick
    local_floor: int = 0  # of which a deadline at risk holds (the engines' deadline floors)
    warned_at: float = -math.inf  # when a projected miss of the deadline was last logged
    pause_until: float = 0.0
    jobs: set[str] = field(default_factory=set)  # hosted batch jobs polled by this process
    # Budget holds of a job's lines (job id -> the book, line number -> hold): settled with
    # each line's cost when the results arrive, released for lines the job did not answer.
    holds: dict[str, tuple[Budgets, dict[int, Reservation]]] = field(default_factory=dict)
    cancelled_jobs: set[str] = field(default_factory=set)


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
        self._store_down = False  # said once until it answers again
        # Per local engine: its adaptive batch concurrency (which keeps the TTFTs of the
        # engine's interactive requests the recorder's observer hands it).
        self._limits: dict[str, BatchConcurrency] = {}

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
                if self._store_down:
                    self._store_down = False
                    log.warning("batch store answers again: batches go on")
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                # A database restart or failover: said once, retried every poll.
                if not self._store_down:
                    self._store_down = True
                    log.warning("batch scheduler paused, the batch store does not answer: "
                                "%s", exc)
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
        active = await asyncio.to_thread(self.store.active)
        self._pace_engines(self._parts())
        for bid, caller, status, endpoint, created, window_s in active:
            run = self._runs.get(bid)
            if run is None:
                run = self._runs[bid] = _Run(bid, caller, endpoint, created + window_s,
                                             self._clock())
                run.pace.started(run.started)  # an engine that takes no line: a pace of 0
                # Hosted jobs a stopped router had submitted: polled again, not resubmitted.
                for job_id, backend, submitted in await asyncio.to_thread(
                        self.store.open_jobs, bid):
                    self._follow(run, job_id, backend, submitted, resumed=True)
            if status == "validating":
                await asyncio.to_thread(self.store.set_status, bid, "in_progress",
                                        only_from=("validating",))
            await self._work(run, status)

    async def _work(self, run: _Run, status: str) -> None:
        parts = self._parts()
        now = self._clock()
        counts = await asyncio.to_thread(self.store.counts, run.id)
        busy = len(run.local) + len(run.hosted)
        if status == "cancelling":
            await self._cancel_jobs(run)
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
        # Local: one line at a time while an engine of the batch's aliases has headroom,
        # up to what the engines' batch concurrency allows next to interactive traffic.
        run.local_allowed = room = self._local_room(parts, run)
        started = 0
        while len(run.local) < room and self._headroom(parts, run):
            if not await self._spawn(run, principal, "local"):
                break
            started += 1
        pending = max(0, counts["pending"] - started)
        # Never leaves (or has no hosted batch price to leave at): what cannot finish
        # locally in time expires; the plan still says how many lines will.
        local_only = (principal.policy.residency == "onprem"
                      or not self._batch_priced(parts, run))
        job_backend = None if local_only else self._job_backend(parts, run)
        plan = self._plan(run, pending, now, hosted=not local_only,
                          jobs=job_backend is not None)
        if job_backend is not None:
            # A batch job's turnaround is La Plateforme's, not projected here.
            plan = dataclasses.replace(plan, shortfall=0)
        run.plan = plan
        self._warn(run, plan, now, local_only)
        if local_only:
            return
        if job_backend is not None:
            # La Plateforme's own Batch API: the remainder goes as one job (one at a time),
            # which has no concurrency cap to wait for.
            want = int(plan.need)
            if want > 0 and not run.jobs:
                await self._submit_job(run, job_backend, want)
            return
        for _ in range(plan.send):
            if not await self._spawn(run, principal, "hosted"):
                break

    def _plan(self, run: _Run, pending: int, now: float, *, hosted: bool,
              jobs: bool) -> HostedPlan:
        """This tick's hosted decision (router/routing/batch_pacing.plan_hosted) from the
        smoothed local pace, the time left and hosted's concurrency and measured latency."""
        b = self._parts().config.batches
        # No pace measured yet: the engines get a moment first.
        warmup = min(10.0, 0.1 * (run.deadline - run.started))
        lines_in_flight = len(run.hosted) - len(run.jobs)
        latency = run.hosted_latency_s or b.hosted_latency_s
        return plan_hosted(
            pending=pending, local_in_flight=len(run.local),
            hosted_in_flight=max(0, lines_in_flight), left_s=run.deadline - now,
            margin=b.deadline_margin, local_pace=run.pace.pace(now, warmup),
            hosted_latency_s=latency,
            # A batch job has no concurrency cap: what it cannot finish in time is not
            # projected here (its turnaround is La Plateforme's).
            hosted_slots=(b.max_lines if jobs else b.hosted_concurrency) if hosted else 0,
            tick_s=b.poll_s,
            # About one hosted line kept in reserve at the end (within the margin's share
            # of the window, so a high guess of the latency does not eat a short window).
            reserve_s=min(latency, b.deadline_margin * (run.deadline - run.started))
            + b.poll_s)

    def _warn(self, run: _Run, plan: HostedPlan, now: float, local_only: bool) -> None:
        """A batch projected to miss its deadline even with hosted at full concurrency
        says so in the log (and in its `spillover` state), at most every 30 s."""
        if plan.shortfall <= 0 or now - run.warned_at < _WARN_EVERY_S:
            return
        run.warned_at = now
        b = self._parts().config.batches
        how = ("local capacity alone (the batch may not go hosted)" if local_only else
               f"local capacity plus hosted at {b.hosted_concurrency} calls at once "
               f"(batches.hosted_concurrency, {run.hosted_latency_s or b.hosted_latency_s:.1f}"
               " s a line)")
        log.warning("batch %s: projected to miss its deadline in %.0f s by %d lines: %s "
                    "finishes %.0f of the rest at a local pace of %.2f lines/s", run.id,
                    run.deadline - now, plan.shortfall, how,
                    plan.local_can + plan.hosted_can,
                    run.pace.pace(now, 0.0) or 0.0)

    def schedule(self, batch_id: str) -> dict[str, Any] | None:
        """The scheduler's view of a batch it works on (the `spillover` field of the batch
        object): local pace, the batch concurrency allowed, the hosted plan, and
        `deadline_at_risk` with the lines projected to miss it."""
        run = self._runs.get(batch_id)
        if run is None:
            return None
        now = self._clock()
        plan = run.plan
        pace = run.pace.pace(now, 0.0)
        return {
            "local_pace_per_s": None if pace is None else round(pace, 3),
            "local_concurrency_allowed": run.local_allowed,
            # The least the engines' batch concurrency may be cut to while the deadline is
            # at risk (0: not raised).
            "local_concurrency_floor": run.local_floor,
            "local_in_flight": len(run.local),
            "hosted_in_flight": max(0, len(run.hosted) - len(run.jobs)),
            "hosted_latency_s": (None if run.hosted_latency_s is None
                                 else round(run.hosted_latency_s, 3)),
            "hosted_needed": None if plan is None else math.ceil(max(0.0, plan.need)),
            "deadline_at_risk": plan is not None and plan.shortfall > 0,
            "projected_shortfall": 0 if plan is None else plan.shortfall,
        }

    def _observe(self, call: Call) -> None:
        """The recorder's observer: the TTFT of interactive requests served locally, the
        signal the engines' batch concurrency follows."""
        if (call.route == "local" and call.ttft_s is not None and call.backend
                and call.facts.priority == "interactive"):
            ctl = self._limits.get(call.backend)
            if ctl is not None:  # an engine no batch uses: nothing to pace
                ctl.observe(self._clock(), call.ttft_s)

    def _local_backends(self, parts: Parts, run: _Run) -> list[Backend]:
        return [b for alias in (run.aliases or parts.catalog.aliases)
                for b in parts.catalog.backends(alias) or () if b.route == "local"]

    def _controller(self, name: str, params: Aimd) -> BatchConcurrency:
        ctl = self._limits.get(name)
        if ctl is None or ctl.params != params:  # new, or a reload changed the SLO
            ctl = self._limits[name] = BatchConcurrency(
                params, start=1.0 if ctl is None else ctl.limit)
        return ctl

    @staticmethod
    def _params(b: Batches) -> Aimd:
        return Aimd(slo_s=b.interactive_ttft_slo_ms / 1000)

    def _pace_engines(self, parts: Parts) -> None:
        """One AIMD step for every local engine a running batch may use, on the
        interactive signal: a percentile of the local interactive TTFTs the router saw
        over the last seconds (the controller's window), and requests waiting at the
        engine with interactive ones in flight (the router's in-flight count beyond the
        batch lines it sent). A batch on the engine projected to miss its deadline
        (`deadline_at_risk` at the last tick) raises the engine's floor."""
        recorder = parts.gateway.recorder
        if self._observe not in recorder.observers:
            recorder.observers.append(self._observe)
        b = parts.config.batches
        params = self._params(b)
        engines = {run.id: {e.name for e in self._local_backends(parts, run)}
                   for run in self._runs.values()}
        names = set().union(*engines.values()) if engines else set()
        backends = {e.name: e for run in self._runs.values()
                    for e in self._local_backends(parts, run)}
        loads = parts.monitor.view(names)
        now = self._clock()
        for name in sorted(names):
            ctl = self._controller(name, params)
            batch = self._batch_in_flight(parts, name)
            load = loads.get(name)
            queued = (load is not None and bool(load.waiting)
                      and (load.inflight or 0) > batch)
            plans = [run.plan for run in self._runs.values()
                     if name in engines[run.id] and run.plan is not None]
            at_risk = any(plan.shortfall > 0 for plan in plans)
            # The floor a risk raised holds while a batch still needs hosted (or more than
            # local capacity gives) to finish by its target.
            slack = all(plan.need <= 0 for plan in plans)
            # In use: at most one line short of the allowance (a tick that a finished line
            # woke sees its slot free before the next line takes it).
            ctl.step(now, queued=queued, in_use=batch + 1 >= ctl.allowed,
                     ceiling=self._ceiling(b, backends.get(name)), at_risk=at_risk,
                     slack=slack)

    @staticmethod
    def _ceiling(b: Batches, engine: Backend | None) -> float:
        """The most batch lines the controller may allow on one engine: the configured
        cap, else the engine's batch line in requests (routing admits a batch request
        while batch_below x max_inflight are not yet in flight)."""
        if b.local_concurrency is not None:
            return float(b.local_concurrency)
        if engine is None or engine.saturation is None:
            return 1.0
        line = engine.batch_line * engine.saturation.max_inflight
        return float(max(1, math.ceil(line - 1e-9)))

    def _batch_in_flight(self, parts: Parts, engine: str) -> int:
        return sum(len(r.local) for r in self._runs.values()
                   if any(e.name == engine for e in self._local_backends(parts, r)))

    def _local_room(self, parts: Parts, run: _Run) -> int:
        """Local lines this batch may have in flight: the engines' adaptive batch
        concurrency, less other batches' lines on them, at most local_concurrency (when
        set)."""
        b = parts.config.batches
        params = self._params(b)
        engines = {e.name for e in self._local_backends(parts, run)}
        ctls = [self._controller(n, params) for n in engines]
        allowed = sum(c.allowed for c in ctls)
        run.local_floor = sum(math.floor(c.deadline_floor + 1e-9) for c in ctls)
        others = sum(len(r.local) for r in self._runs.values() if r is not run
                     and engines & {e.name for e in self._local_backends(parts, r)})
        room = allowed - others
        return max(0, room if b.local_concurrency is None else min(b.local_concurrency, room))

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

    def _job_backend(self, parts: Parts, run: _Run) -> Backend | None:
        """The batch's batch-priced hosted offering on a provider with a batch API of its
        own (La Plateforme), with its key; None: ordinary calls at the batch class."""
        if parts.http is None or run.endpoint != "/v1/chat/completions":
            return None
        for alias in sorted(run.aliases):
            for b in parts.catalog.backends(alias) or ():
                if (b.route == "hosted" and b.batch_price is not None
                        and b.flavour == "mistral" and b.api_key_env
                        and parts.api_keys.get(b.api_key_env)):
                    return b
        return None

    async def _submit_job(self, run: _Run, backend: Backend, n: int) -> None:
        """Up to `n` lines as one La Plateforme batch job. Each line first holds its worst
        case at the batch price against the caller's budgets, as a single hosted request
        does; lines the budgets refuse stay pending (local capacity may still run them, or
        they expire) and are not sent. A budget store that does not answer: nothing sent.

        A line whose worst case is over the caller's per-request limit (max_request_usd,
        the caller's or the global one) is not sent either: it goes the way of a single
        request at the batch class instead (hosted ruled out by the same check), so it
        runs locally, or fails with the error a single request gets (400 cost_limit)."""
        parts = self._parts()
        lines = await asyncio.to_thread(self.store.claim, run.id, n, "hosted")
        if not lines:
            return
        principal = _principal(parts.config, run.caller)
        caller = principal.name if principal is not None else run.caller
        budgets = parts.gateway.budgets
        assumed = parts.config.routing.default_max_tokens
        ceilings = [x for x in (principal.policy.max_request_usd if principal else None,
                                parts.config.budget.max_request_usd) if x is not None]
        limit = min(ceilings) if ceilings else None
        held: dict[int, Reservation] = {}
        carried: list[Line] = []
        over: list[Line] = []  # over the per-request limit: run as single requests, never released
        try:
            file_id = await asyncio.to_thread(self.store.input_file, run.id)
            out = bytearray()
            translate = MistralTranslator()
            for line in lines:
                item = await asyncio.to_thread(self.store.read_line, file_id, line)
                try:
                    facts = dataclasses.replace(facts_for("chat", item["body"], {}),
                                                assumed_max_tokens=assumed, priority="batch")
                except SpilloverError:
                    continue  # not a request a hold can be sized for: left to run locally
                worst = facts.worst_case_usd(backend)
                if limit is not None and worst > limit and principal is not None:
                    over.append(line)
                    continue
                hold = await budgets.reserve(caller, worst)
                if hold is None:
                    continue  # over the budget: not sent
                held[line.line_no] = hold
                prep = translate.request("chat", item["body"], backend.model_id, False)
                # The max_tokens the hold assumed, so no answer outgrows it.
                bound_output(prep, "chat", assumed)
                body = prep.body
                body.pop("model", None)  # the job's model
                body.pop("stream", None)
                out += orjson.dumps({"custom_id": str(line.line_no), "body": body}) + b"\n"
                carried.append(line)
            for line in lines:
                if line.line_no not in held and line not in over:
                    await asyncio.to_thread(self.store.release, line)
            if principal is not None:  # (over is empty otherwise)
                for line in over:
                    # "auto": the gateway decides as for a single request; its limit check
                    # leaves only local (or the cost_limit refusal) to this line.
                    task = asyncio.create_task(
                        self._run_line(run, principal, line, "auto"),
                        name=f"spillover-batch-{run.id}-{line.line_no}")
                    run.local.add(task)
                    task.add_done_callback(run.local.discard)
            if not carried:
                log.info("batch %s: no line of the remainder may go in a job (budget, "
                         "per-request limit)", run.id)
                run.pause_until = self._clock() + 1.0
                return
            client = self._client(parts, backend)
            mistral_file = await client.upload(f"{run.id}.jsonl", bytes(out))
            hours = max(1, math.ceil((run.deadline - self._clock()) / 3600))
            # The intent first, durably: a router killed after the create call but before
            # the job's id is stored finds the job again by this token, in its metadata,
            # and adopts it (_poll_job) instead of sending (and paying for) the lines twice.
            token = new_job_token()
            await asyncio.to_thread(self.store.intend_job, run.id, token, backend.name,
                                    carried)
        except Exception as exc:
            # Not submitted: holds go, the lines back to pending, tried again next turn.
            log.warning("batch %s: hosted batch job not submitted: %s", run.id,
                        exc if isinstance(exc, (BatchJobError, StoreUnavailable))
                        else type(exc).__name__)
            for hold in held.values():
                budgets.release(hold)
            for line in lines:
                if line not in over:
                    await asyncio.to_thread(self.store.release, line)
            run.pause_until = self._clock() + 1.0
            return
        try:
            job = await client.create(mistral_file, backend.model_id, run.endpoint,
                                      {"spillover_batch": run.id, "spillover_job": token},
                                      min(hours, 168))
            job_id = str(job["id"])
            await asyncio.to_thread(self.store.job_created, token, job_id)
        except Exception as exc:
            # Refused, or no answer: it may exist all the same. The token is followed: the
            # job is adopted if La Plateforme has it, else its lines go back to pending.
            log.warning("batch %s: hosted batch job %s: create not confirmed: %s", run.id,
                        token, exc if isinstance(exc, (BatchJobError, StoreUnavailable))
                        else type(exc).__name__)
            job_id = token
        else:
            log.info("batch %s: %d lines sent as La Plateforme batch job %s", run.id,
                     len(carried), job_id)
        run.holds[job_id] = (budgets, held)
        self._follow(run, job_id, backend.name, self._clock(), resumed=False)

    def _client(self, parts: Parts, backend: Backend) -> MistralBatches:
        assert parts.http is not None and backend.api_key_env
        key = parts.api_keys.get(backend.api_key_env)
        assert key
        return MistralBatches(parts.http, backend.base_url, key)

    def _follow(self, run: _Run, job_id: str, backend: str, submitted: float, *,
                resumed: bool) -> None:
        run.jobs.add(job_id)
        task = asyncio.create_task(self._poll_job(run, job_id, backend, submitted, resumed),
                                   name=f"spillover-batch-job-{job_id}")
        run.hosted.add(task)
        task.add_done_callback(run.hosted.discard)

    async def _cancel_jobs(self, run: _Run) -> None:
        parts = self._parts()
        for job_id in run.jobs - run.cancelled_jobs:
            backend = next((b for b in parts.catalog.all() if b.flavour == "mistral"
                            and b.api_key_env and parts.api_keys.get(b.api_key_env)), None)
            if backend is None or parts.http is None:
                continue
            try:
                await self._client(parts, backend).cancel(job_id)
                run.cancelled_jobs.add(job_id)
            except (BatchJobError, httpx.HTTPError) as exc:
                log.warning("batch %s: cancel of job %s failed: %s", run.id, job_id, exc)

    async def _poll_job(self, run: _Run, job_id: str, backend_name: str, submitted: float,
                        resumed: bool) -> None:
        """Poll the job until it ends (every poll_s at first, doubling up to 30 s), then
        book its lines: each result is the line's outcome and one ledger row at the batch
        price with the job's usage; lines it did not answer go back to pending.

        A job known only by its token (its create call was never confirmed, or the router
        died before storing the answer) is looked up at La Plateforme by the token in its
        metadata first: adopted when found, else its lines go back to pending."""
        wait = self._parts().config.batches.poll_s
        token = job_id if is_job_token(job_id) else None
        try:
            while True:
                parts = self._parts()
                backend = parts.catalog.get(backend_name)
                if backend is None or parts.http is None:
                    log.warning("batch %s: job %s's offering is gone from the config",
                                run.id, job_id)
                    await asyncio.sleep(_JOB_POLL_MAX_S)
                    continue
                client = self._client(parts, backend)
                try:
                    if job_id == token:
                        found = await client.find({"spillover_job": token})
                        if found is None:
                            log.info("batch %s: job %s was never created; its lines go "
                                     "back to pending", run.id, token)
                            await asyncio.to_thread(self.store.end_job, token,
                                                    "not_created")
                            return
                        job_id = str(found["id"])
                        await asyncio.to_thread(self.store.job_created, token, job_id)
                        run.jobs.discard(token)
                        run.jobs.add(job_id)
                        if token in run.holds:
                            run.holds[job_id] = run.holds.pop(token)
                        log.info("batch %s: adopted La Plateforme batch job %s (submitted "
                                 "as %s)", run.id, job_id, token)
                    job = await client.get(job_id)
                    status = str(job.get("status"))
                    if status in ENDED:
                        await self._book_job(run, client, backend, job, submitted, resumed)
                        await asyncio.to_thread(self.store.end_job, job_id, status)
                        return
                except (BatchJobError, httpx.HTTPError, ValueError, KeyError) as exc:
                    log.warning("batch %s: job %s not read: %s", run.id, job_id, exc)
                await asyncio.sleep(wait)
                wait = min(_JOB_POLL_MAX_S, wait * 2)
        finally:
            run.jobs.discard(job_id)
            # Lines the job did not answer (or a stop before its end): their holds go.
            budgets, held = run.holds.pop(job_id, (None, {}))
            for hold in held.values():
                if budgets is not None:
                    budgets.release(hold)
            self.wake()

    async def _book_job(self, run: _Run, client: MistralBatches, backend: Backend,
                        job: dict[str, Any], submitted: float, resumed: bool) -> None:
        lines = {ln.line_no: ln for ln in await asyncio.to_thread(
            self.store.job_lines, str(job["id"]))}
        # Rows a stopped router wrote for lines whose results it did not commit: the job
        # was billed once, those rows stand and are not written again.
        booked = (await asyncio.to_thread(self.store.booked, list(lines.values()))
                  if resumed else set())
        budgets, held = run.holds.get(str(job["id"]), (self._parts().gateway.budgets, {}))
        results: list[dict[str, Any]] = []
        for key in ("output_file", "error_file"):
            if job.get(key):
                results += await client.results(str(job[key]))
        ledger = self._parts().gateway.recorder.ledger
        now = self._clock()
        for item in results:
            try:
                line = lines.pop(int(item["custom_id"]))
            except (KeyError, ValueError, TypeError):
                continue
            response = item.get("response") or {}
            code = int(response.get("status_code") or 500)
            body = response.get("body")
            if not isinstance(body, dict) or item.get("error"):
                code = code if code >= 400 else 502
                body = {"error": {"message": "La Plateforme's batch job failed this line",
                                  "type": "api_error", "param": None,
                                  "code": "hosted_batch_line_failed"}}
            got = body.get("usage")
            usage: dict[str, Any] = got if isinstance(got, dict) else {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            price = backend.batch_price
            rid = line_request_id(run.id, line.line_no)
            cost = price.cost(prompt, completion) if price is not None else 0.0
            if line.line_no not in booked:
                await self._settle(run, budgets, held.pop(line.line_no, None), cost,
                                   code, bool(usage))
            if ledger is not None and line.line_no not in booked:
                full = self._parts().catalog.hosted_price(backend.alias)
                await ledger.record(LedgerRow(
                    ts=submitted, request_id=rid, caller=run.caller, alias=backend.alias,
                    route="hosted", backend=backend.label, model_id=backend.model_id,
                    prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost,
                    hosted_equiv_usd=full.cost(prompt, completion) if full else cost,
                    latency_s=max(0.0, now - submitted), ttft_s=None, status=code,
                    reason="forced", endpoint="chat", batch_id=run.id, priority="batch"))
            await asyncio.to_thread(
                self.store.finish_line, line, ok=code < 400, status_code=code,
                request_id=rid, result=orjson.dumps(body), route="hosted")
        if lines and str(job.get("status")) != "CANCELLED":
            log.warning("batch %s: job %s ended %s without %d lines", run.id, job["id"],
                        job.get("status"), len(lines))

    async def _settle(self, run: _Run, budgets: Budgets, hold: Reservation | None,
                      cost: float, status: int, usage_seen: bool) -> None:
        """A job line's spend against the budgets: its hold settled with the real cost (as
        dispatch does: without usage, a served line costs its hold). A job a restarted
        router polls again has no holds: the spend is booked on a zero hold."""
        try:
            if hold is None:
                hold = await budgets.reserve(run.caller, 0.0)
                if hold is None:
                    return
            spent = cost if usage_seen else hold.amount_usd if status < 400 else 0.0
            budgets.settle(hold, spent)
        except (StoreUnavailable, ValueError) as exc:
            log.warning("batch %s: a job line's spend not booked in the budgets: %s",
                        run.id, exc)

    def _headroom(self, parts: Parts, run: _Run) -> bool:
        names: list[str] = []
        lines: dict[str, float] = {}
        for alias in run.aliases or parts.catalog.aliases:
            for b in parts.catalog.backends(alias) or ():
                if b.route == "local":
                    names.append(b.name)
                    lines[b.name] = b.batch_line
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
        began = self._clock()
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
            status, served, request_id = 500, "", line_request_id(run.id, line.line_no)
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
            run.pace.finished(self._clock())
        elif served == "hosted" and status < 400:
            took = self._clock() - began
            run.hosted_latency_s = (took if run.hosted_latency_s is None else
                                    _LATENCY_EWMA * took
                                    + (1 - _LATENCY_EWMA) * run.hosted_latency_s)
        self.wake()

    async def _call(self, run: _Run, principal: Principal, line: Line, body: dict[str, Any],
                    route: str) -> tuple[int, bytes, str, str]:
        parts = self._parts()
        rid = line_request_id(run.id, line.line_no)
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
