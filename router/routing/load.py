"""Live load of the local engines: scraped vLLM metrics plus the router's own in-flight count.

vLLM's metrics lag the real load by a second or more, so the in-flight count (updated
synchronously as requests start and finish) is the fresh signal; the scrape adds what
only the engine knows (its queue, its KV cache). Saturation has hysteresis so routing
does not flap around one threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.config import Saturation
from router.routing.catalog import Backend
from router.routing.engine_apis import EngineApis
from router.routing.policy import EngineLoad
from router.routing.replicas import Choice, Resolver, choose, dns_resolver, replica_url
from router.routing.resilience import Breakers, replica_name

log = logging.getLogger("spillover.signals")

_WANTED = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",  # vLLM before the V1 engine renamed it
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
)


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    running: float
    waiting: float
    kv_cache: float | None
    generation_tokens: float | None
    prompt_tokens: float | None


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Sum the gauges over every label set (one engine may report several model names)."""
    # Only the few families routing reads go through the parser: vLLM's histograms
    # make the full page large and this runs several times a second.
    lines = [ln for ln in text.splitlines() if any(w in ln for w in _WANTED)]
    values: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            values[name] = values.get(name, 0.0) + sample.value
    kv = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc"))
    return EngineMetrics(
        running=values.get("vllm:num_requests_running", 0.0),
        waiting=values.get("vllm:num_requests_waiting", 0.0),
        kv_cache=kv,
        generation_tokens=values.get("vllm:generation_tokens"),
        prompt_tokens=values.get("vllm:prompt_tokens"),
    )


class _Engine:
    __slots__ = (
        "_last_tokens",
        "backend",
        "base_url",
        "batch_inflight",
        "down_reason",
        "healthy",
        "inflight",
        "key",
        "metrics",
        "metrics_at",
        "sat",
        "saturated",
        "slow_since",
        "tokens_per_s",
        "up_at",
        "urgent_saturated",
    )

    def __init__(self, backend: Backend, base_url: str | None = None,
                 key: str | None = None) -> None:
        assert backend.saturation is not None
        self.backend = backend
        self.key = backend.name if key is None else key  # as in status(): name[@replica]
        self.base_url = backend.base_url if base_url is None else base_url
        self.sat: Saturation = backend.saturation
        self.healthy = False
        self.down_reason = "not checked yet"
        self.inflight = 0
        self.batch_inflight = 0  # of inflight, the batch class's
        self.metrics: EngineMetrics | None = None
        self.metrics_at = 0.0
        self.saturated = False
        self.urgent_saturated = False  # the same, batch requests left out (priority engines)
        self.slow_since: float | None = None
        self.tokens_per_s: float | None = None
        self._last_tokens: tuple[float, float] | None = None
        self.up_at: float | None = None  # monotonic time it last turned healthy


class LoadMonitor:
    def __init__(
        self,
        client: httpx.AsyncClient,
        backends: Iterable[Backend],
        *,
        interval_s: float = 0.5,
        stale_s: float = 5.0,
        probe_timeout_s: float = 2.0,
        engine_note: Callable[[str], tuple[bool, str] | None] | None = None,
        started_at: Callable[[str], float | None] | None = None,
        ready_after: dict[str, float] | None = None,
        resolver: Resolver | None = None,
        resolve_interval_s: float = 5.0,
        breakers: Breakers | None = None,
        apis: EngineApis | None = None,
    ) -> None:
        self._client = client
        # Which API surfaces (Messages, Responses) each engine serves itself, probed here.
        self.apis = apis if apis is not None else EngineApis()
        # When this process started the engine's current process (monotonic), if it runs:
        # down since then means starting, which waiting fixes. `ready_after` keeps how long
        # each engine's last start took (shared across reloads), its expected readiness.
        self._started_at = started_at
        self._ready_after = ready_after if ready_after is not None else {}
        # From the engines' supervisor, when this process manages them: (running, why).
        # Not running: nothing that answers on the port is ours (an orphan, another
        # program), so the engine is down whatever the probes say.
        self._engine_note = engine_note
        local = [b for b in backends if b.route == "local"]
        self._engines = {b.name: _Engine(b) for b in local if b.discover is None}
        # Deployments found by DNS: name -> replica ("address:port") -> its own engine state.
        self._discovered = {b.name: b for b in local if b.discover is not None}
        self._replicas: dict[str, dict[str, _Engine]] = {n: {} for n in self._discovered}
        self._resolve_error: dict[str, str] = {}
        self._resolver: Resolver = dns_resolver if resolver is None else resolver
        self._resolve_interval = resolve_interval_s
        self._resolved_at = float("-inf")
        # Each replica's own circuit breaker lives with the router's breakers (so /status,
        # metrics and explain show it beside the hosted ones'); the breakers outlive a
        # reload, so those of deployments no longer discovered go here.
        self._breakers = breakers if breakers is not None else Breakers(3, 10.0)
        for gone in self._breakers.replica_deployments() - set(self._discovered):
            self._breakers.drop_replicas(gone)
        self._interval = interval_s
        self._stale = stale_s
        self._timeout = httpx.Timeout(probe_timeout_s)
        self._task: asyncio.Task[None] | None = None
        # Replaced on every notify, so a waiter wakes once per change.
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self, timeout_s: float) -> None:
        """Until the load may have changed (a request ended, a probe came back) or the
        timeout passed; requests waiting for local capacity re-decide then."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._changed.wait()

    def tokens_per_s(self, name: str) -> float | None:
        e = self._engines.get(name)
        return None if e is None else e.tokens_per_s

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="spillover-load-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # a probe bug must not kill the monitor
                log.exception("load refresh failed")

    async def refresh(self) -> None:
        now = time.monotonic()
        if self._discovered and now - self._resolved_at >= self._resolve_interval:
            self._resolved_at = now
            await asyncio.gather(*(self._resolve(b) for b in self._discovered.values()))
        engines = [*self._engines.values(),
                   *(e for reps in self._replicas.values() for e in reps.values())]
        await asyncio.gather(*(self._probe(e) for e in engines))
        self._notify()

    async def resolve_now(self) -> None:
        """Resolve every discovered deployment at the next refresh, not at its interval."""
        self._resolved_at = float("-inf")
        await self.refresh()

    async def _resolve(self, b: Backend) -> None:
        assert b.discover is not None and b.port is not None
        try:
            async with asyncio.timeout(self._timeout.connect or 2.0):
                addresses = await self._resolver(b.discover, b.port)
        except (OSError, TimeoutError) as exc:
            # A failed lookup is not an empty answer: the replicas known stay.
            self._resolve_error[b.name] = f"{b.discover} did not resolve: {exc}"
            log.warning("deployment %s: %s", b.name, self._resolve_error[b.name])
            return
        self._resolve_error.pop(b.name, None)
        reps = self._replicas[b.name]
        wanted = {f"{a}:{b.port}" if ":" not in a else f"[{a}]:{b.port}": a
                  for a in addresses}
        self._breakers.drop_replicas(b.name, wanted)  # a replica's breaker goes with it
        for replica in wanted:
            self._breakers.replica(b.name, replica)
        for gone in set(reps) - set(wanted):
            log.info("deployment %s: replica %s gone", b.name, gone)
            del reps[gone]
            self.apis.forget([f"{b.name}@{gone}"])
        for new in sorted(set(wanted) - set(reps)):
            log.info("deployment %s: replica %s found", b.name, new)
            reps[new] = _Engine(b, replica_url(wanted[new], b.port), f"{b.name}@{new}")

    async def _probe(self, e: _Engine) -> None:
        note = self._engine_note(e.backend.name) if self._engine_note is not None else None
        if note is not None and not note[0]:
            self._set_down(e, note[1])
            return
        root = e.base_url.removesuffix("/v1")
        try:
            health, metrics = await asyncio.gather(
                self._client.get(root + "/health", timeout=self._timeout),
                self._client.get(root + "/metrics", timeout=self._timeout),
            )
        except httpx.TimeoutException:
            # An engine busy with work (its API server shares the CPU with the model on
            # small hosts) answers probes late: that is load, not death, until it lasts.
            now = time.monotonic()
            if e.slow_since is None:
                e.slow_since = now
            if not e.healthy or now - e.slow_since > self._stale:
                self._set_down(e, "probes time out")
            return
        except httpx.HTTPError as exc:
            self._set_down(e, f"unreachable: {type(exc).__name__}")
            return
        e.slow_since = None
        if health.status_code != 200:
            self._set_down(e, f"/health answered {health.status_code}")
            return
        if not e.healthy:
            log.info("engine %s is up", e.backend.name)
            now = time.monotonic()
            start = self._started_at(e.backend.name) if self._started_at else None
            if start is not None and (e.up_at is None or e.up_at < start):
                self._ready_after[e.backend.name] = now - start
            e.up_at = now
            self.apis.recheck(e.key)  # maybe another build, or other flags, than before
        e.healthy = True
        e.down_reason = ""
        if self.apis.due(e.key):
            await self.apis.probe(self._client, e.key, e.base_url, self._timeout)
        if metrics.status_code == 200:
            m = parse_vllm_metrics(metrics.text)
            now = time.monotonic()
            if m.generation_tokens is not None:
                if e._last_tokens is not None and now > e._last_tokens[0]:
                    dt = now - e._last_tokens[0]
                    rate = max(0.0, m.generation_tokens - e._last_tokens[1]) / dt
                    # Smoothed so one idle scrape does not zero the throughput estimate.
                    prev = e.tokens_per_s
                    e.tokens_per_s = rate if prev is None else 0.8 * prev + 0.2 * rate
                e._last_tokens = (now, m.generation_tokens)
            e.metrics, e.metrics_at = m, now

    def _set_down(self, e: _Engine, why: str) -> None:
        note = self._engine_note(e.backend.name) if self._engine_note is not None else None
        if note is not None and note[0]:
            why = f"{why}; {note[1]}"  # the exit and log lines that explain it
        if e.healthy:
            log.warning("engine %s is down: %s", e.backend.name, why)
        e.healthy = False
        e.down_reason = why
        e.metrics = None

    def mark_down(self, name: str, why: str, replica: str | None = None) -> None:
        """A request just failed to connect: do not wait for the next probe to notice."""
        e = (self._engines.get(name) if replica is None
             else self._replicas.get(name, {}).get(replica))
        if e is not None:
            self._set_down(e, why)
            self._notify()

    def acquire(self, name: str, replica: str | None = None, *, batch: bool = False) -> None:
        e = (self._engines.get(name) if replica is None
             else self._replicas.get(name, {}).get(replica))
        if e is not None:
            e.inflight += 1
            e.batch_inflight += batch
        if replica is not None and (rb := self._breakers.find(replica_name(name, replica))):
            rb.allow()  # a half-open replica's one probe is this request

    def release(self, name: str, replica: str | None = None, *, batch: bool = False) -> None:
        e = (self._engines.get(name) if replica is None
             else self._replicas.get(name, {}).get(replica))
        if replica is not None and (rb := self._breakers.find(replica_name(name, replica))):
            rb.release()  # the verdict is the dispatcher's, if any (a caller may leave)
        if e is not None and e.inflight > 0:
            e.inflight -= 1
            if batch and e.batch_inflight > 0:
                e.batch_inflight -= 1
            self._notify()

    def pick(self, name: str, key: str | None = None, *, tried: Collection[str] = (),
             turn: int = 0) -> tuple[str, str, Choice] | None:
        """For a discovered deployment: (replica, its base URL, why) for a request whose
        conversation key is `key`; None for a deployment with one engine, or none found
        (or, for a retry after `tried` failed, no usable sibling: replicas.choose)."""
        reps = self._replicas.get(name)
        if not reps:
            return None
        now = time.monotonic()
        choice = choose([(r, self._load(e, now)) for r, e in reps.items()], key,
                        blocked=self._breakers.replicas_unavailable(name), tried=tried,
                        turn=turn)
        if choice is None:
            return None
        return choice.replica, reps[choice.replica].base_url, choice

    def replicas(self, name: str) -> list[str]:
        return sorted(self._replicas.get(name, {}))

    def view(self, names: Iterable[str] | None = None) -> dict[str, EngineLoad]:
        """The load of every engine, or of `names` only (a request's own candidates)."""
        now = time.monotonic()
        if names is None:
            out = {name: self._load(e, now) for name, e in self._engines.items()}
            out.update({name: self._deployment_load(name, now) for name in self._replicas})
            return out
        engines, replicas = self._engines, self._replicas
        return {name: (self._load(e, now) if (e := engines.get(name)) is not None
                       else self._deployment_load(name, now))
                for name in names if name in engines or name in replicas}

    def _deployment_load(self, name: str, now: float) -> EngineLoad:
        """A discovered deployment as routing sees it: as good as its best replica (it
        spills only when every replica is full or down), with every replica's requests."""
        # A replica whose circuit is open is as good as down to routing.
        blocked = self._breakers.replicas_unavailable(name)
        loads = [self._load(e, now) if r not in blocked
                 else dataclasses.replace(self._load(e, now), healthy=False)
                 for r, e in self._replicas[name].items()]
        if not loads:
            return EngineLoad(healthy=False, saturated=False, score=0.0)
        best = min(loads, key=lambda x: (not x.healthy, x.saturated, x.score))
        return dataclasses.replace(best, inflight=sum(x.inflight for x in loads),
                                   batch_inflight=sum(x.batch_inflight for x in loads))

    def _score(self, e: _Engine, fresh: EngineMetrics | None, inflight: int) -> float:
        """Every load signal as a share of its limit, the highest (>= 1: full)."""
        sat = e.sat
        ratios = [inflight / sat.max_inflight]
        if fresh is not None:
            ratios.append(fresh.waiting / (sat.max_waiting + 1))
            if fresh.kv_cache is not None:
                ratios.append(fresh.kv_cache / sat.max_kv_cache)
            if sat.max_running is not None:
                # vLLM's running gauge counts only the requests in the engine's batch, not
                # those its API server is still preparing or answering, a large share of a
                # short request's life on a small model (README: "Measuring busy"):
                # the router's own requests there that are not queued count as running.
                running = max(fresh.running, inflight - fresh.waiting)
                ratios.append(running / sat.max_running)
        if e.slow_since is not None:
            ratios.append(1.0)
        return max(ratios)

    @staticmethod
    def _hysteresis(was: bool, score: float, over_waiting: bool, resume_below: float) -> bool:
        # Full at 1.0; back to accepting only once every signal is under the low watermark.
        if was:
            return not (score < resume_below and not over_waiting)
        return score >= 1.0 or over_waiting

    def _load(self, e: _Engine, now: float) -> EngineLoad:
        sat = e.sat
        m = e.metrics
        age = now - e.metrics_at if m is not None else None
        fresh = m if (m is not None and age is not None and age <= self._stale) else None
        over_waiting = fresh is not None and fresh.waiting > sat.max_waiting
        score = self._score(e, fresh, e.inflight)
        e.saturated = self._hysteresis(e.saturated, score, over_waiting, sat.resume_below)
        urgent: float | None = None
        if e.backend.priority_scheduling:
            # The engine serves interactive and standard requests ahead of batch work:
            # their admission leaves the batch's own requests out. (vLLM's waiting and
            # KV gauges cannot be split by class and still count.)
            urgent = self._score(e, fresh, e.inflight - e.batch_inflight)
            e.urgent_saturated = self._hysteresis(e.urgent_saturated, urgent, over_waiting,
                                                  sat.resume_below)
        start = self._started_at(e.backend.name) if self._started_at and not e.healthy else None
        starting = start is not None and (e.up_at is None or e.up_at < start)
        took = self._ready_after.get(e.backend.name)
        return EngineLoad(
            starting=starting,
            starting_for_s=now - start if starting and start is not None else None,
            ready_in_s=(max(0.0, took - (now - start))
                        if starting and start is not None and took is not None else None),
            healthy=e.healthy,
            saturated=e.healthy and e.saturated,
            score=score,
            inflight=e.inflight,
            urgent_saturated=None if urgent is None else e.healthy and e.urgent_saturated,
            urgent_score=urgent,
            batch_inflight=e.batch_inflight,
            waiting=fresh.waiting if fresh else None,
            running=fresh.running if fresh else None,
            kv_cache=fresh.kv_cache if fresh else None,
            age_s=age,
        )

    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        now = time.monotonic()
        engines = [(name, e) for name, e in self._engines.items()]
        for name, reps in self._replicas.items():
            b = self._discovered[name]
            load = self._deployment_load(name, now)
            why = self._resolve_error.get(name) or (
                None if reps else f"{b.discover} resolves to no replica")
            healthy = [r for r, e in reps.items() if e.healthy]
            out[name] = {
                "alias": b.alias, "discover": b.discover, "replicas": sorted(reps),
                "healthy": load.healthy,
                "down_reason": why if not healthy else None,
                "saturated": load.saturated, "score": round(load.score, 3),
                "inflight": load.inflight, "healthy_replicas": len(healthy),
            }
            engines += [(f"{name}@{r}", e) for r, e in sorted(reps.items())]
        for name, e in engines:
            load = self._load(e, now)
            out[name] = {
                "alias": e.backend.alias,
                "healthy": e.healthy,
                "down_reason": e.down_reason or None,
                "saturated": load.saturated,
                "score": round(load.score, 3),
                "inflight": e.inflight,
                "batch_inflight": e.batch_inflight,
                "waiting": load.waiting,
                "running": load.running,
                "kv_cache": load.kv_cache,
                "metrics_age_s": None if load.age_s is None else round(load.age_s, 3),
                "tokens_per_s": None if e.tokens_per_s is None else round(e.tokens_per_s, 1),
                "apis": self.apis.status(e.key),
            }
        for name, reps in self._replicas.items():
            for r in reps:
                if (rb := self._breakers.find(replica_name(name, r))) is not None:
                    out[replica_name(name, r)]["breaker"] = rb.snapshot()
            if reps and not out[name]["healthy"] and out[name]["down_reason"] is None:
                out[name]["down_reason"] = "every replica is down or its circuit is open"
        return out
