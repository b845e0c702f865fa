"""The running gateway's parts: built from models.yaml, swapped whole by a reload,
started and stopped by the app's lifespan."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from router.accounting.budgets import Budgets, local_cost_per_mtok
from router.accounting.recorder import Recorder
from router.accounting.storage import budget_book, open_ledger
from router.config import Config, Price, load_config
from router.errors import InvalidRequest, Unavailable
from router.metrics import Metrics
from router.providers import translator_for
from router.routing.auth import Authenticator
from router.routing.catalog import Backend, Catalog
from router.routing.dispatch import Dispatcher
from router.routing.gateway import Gateway
from router.routing.load import LoadMonitor
from router.routing.ratelimit import RateLimiter, StreamSlots
from router.routing.replicas import Resolver
from router.routing.resilience import Breakers, RetryPolicy
from router.routing.tracing import Tracing
from router.upstreams.h1 import H1Upstream
from router.upstreams.transport import AiohttpUpstream, HttpxUpstream, Upstream
from serving.engine import EngineSupervisor
from serving.gpu import GpuProbe, read_host

log = logging.getLogger("spillover")


@dataclass(frozen=True, slots=True)
class Parts:
    """Everything built from one models.yaml, consistent with each other.

    A reload builds a new one and swaps it in one assignment (`Runtime.parts`). A handler
    reads `runtime.parts` once and uses that object to the end: across an await a second
    read may see the next config, and mixing the two (one config's auth, another's
    catalog) is what this object exists to prevent.
    """

    config: Config
    catalog: Catalog
    monitor: LoadMonitor
    api_keys: Mapping[str, str | None]
    budgets: Budgets
    limiter: RateLimiter
    breakers: Breakers
    dispatcher: Dispatcher
    auth: Authenticator
    gateway: Gateway


class Runtime:
    """The running gateway; created by `create_app`, started by its lifespan.

    Long-lived parts (HTTP clients, ledger, recorder, stream slots, metrics) live here;
    everything derived from models.yaml is in `parts`, rebuilt by `reload` and swapped in
    one assignment: requests in flight finish on the parts they started with.
    """

    parts: Parts

    def __init__(self, config: Config, env: Mapping[str, str],
                 transport: httpx.AsyncBaseTransport | None = None,
                 config_path: str = "models.yaml", resolver: Resolver | None = None,
                 tracing: Tracing | None = None) -> None:
        server = config.server
        # OpenTelemetry traces when the OTEL_* variables ask for them (tests pass their own).
        self.tracing = tracing if tracing is not None else Tracing.from_env(env)
        # How discovered deployments' DNS names are resolved (tests inject their own).
        self.resolver = resolver
        self.env = env
        self.config_path = config_path
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0),
            limits=httpx.Limits(max_connections=server.max_connections,
                                max_keepalive_connections=server.max_keepalive_connections,
                                keepalive_expiry=30.0),
            trust_env=False,  # a proxy set for the shell must not capture loopback engines
        )
        # The probes use the httpx client; requests go through the hot-path clients (plain
        # HTTP to the engines, aiohttp for TLS), or through httpx too when a transport is
        # injected (tests, embedders).
        self.upstream: Upstream = (
            HttpxUpstream(self.client) if transport is not None
            else H1Upstream(max_connections=server.max_connections,
                            tls=AiohttpUpstream(max_connections=server.max_connections)))
        self.ledger = open_ledger(server, env)
        self.recorder = Recorder(self.ledger)
        # Streams each caller holds open: kept across reloads, which rebuild the gateway.
        self.streams = StreamSlots()
        self.gpu: GpuProbe | None = None
        # Set by `spillover serve` when it manages the engines: their pids and restarts.
        self.supervisor: EngineSupervisor | None = None
        # How long each managed engine took to start last time, kept across reloads.
        self._ready_after: dict[str, float] = {}
        self._install(config, breakers=None, budgets=None)
        # Reloads take turns: two interleaved ones each started a load monitor and stopped
        # the other's before it ran, leaving monitors that nothing ever stopped.
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[Config]] = set()
        self._stopped = False
        self.metrics = Metrics(self.catalog.aliases)
        self.metrics.watch(lambda: self.monitor.status(), lambda: self.breakers.snapshot(),
                           lambda: self.budgets.snapshot(), self.recorder.today,
                           ledger=self.ledger.health.snapshot)
        self.recorder.observers.append(self.metrics.observe)

    # Shorthands for the current parts: each reads `parts` afresh, so code that awaits
    # between two of them must read `parts` once instead.
    @property
    def config(self) -> Config:
        return self.parts.config

    @property
    def catalog(self) -> Catalog:
        return self.parts.catalog

    @property
    def monitor(self) -> LoadMonitor:
        return self.parts.monitor

    @property
    def api_keys(self) -> Mapping[str, str | None]:
        return self.parts.api_keys

    @property
    def budgets(self) -> Budgets:
        return self.parts.budgets

    @property
    def limiter(self) -> RateLimiter:
        return self.parts.limiter

    @property
    def breakers(self) -> Breakers:
        return self.parts.breakers

    @property
    def dispatcher(self) -> Dispatcher:
        return self.parts.dispatcher

    @property
    def auth(self) -> Authenticator:
        return self.parts.auth

    @property
    def gateway(self) -> Gateway:
        return self.parts.gateway

    def _install(self, config: Config, breakers: Breakers | None,
                 budgets: Budgets | None) -> None:
        """Build every config-derived part and swap them in with one assignment."""
        catalog = Catalog(config)
        server = config.server
        r = config.routing
        if breakers is None or (breakers.failures_to_open, breakers.cooldown_s) != (
                r.breaker_failures, r.breaker_cooldown_s):
            breakers = Breakers.from_routing(r)
        monitor = LoadMonitor(self.client, catalog.all(), interval_s=server.metrics_interval_s,
                              stale_s=server.metrics_stale_s, engine_note=self._engine_note,
                              started_at=self._engine_started_at,
                              ready_after=self._ready_after, resolver=self.resolver,
                              resolve_interval_s=server.discover_interval_s,
                              breakers=breakers)
        key_envs = {p.api_key_env for p in config.providers.values() if p.api_key_env}
        api_keys = {name: self.env.get(name) for name in key_envs}
        translators = {b.name: translator_for(b.flavour) for b in catalog.all()}
        # One book for the life of the process: a reload changes its limits only, so the
        # reservations and spend of calls in flight across the reload are kept.
        reload = budgets is not None
        if budgets is None:
            budgets = budget_book(config, self.ledger)
        limiter = RateLimiter({name: c.rate_limit for name, c in config.callers.items()})
        dispatcher = Dispatcher(
            self.upstream, monitor, translators, api_keys,
            breakers=breakers, retry=RetryPolicy.from_routing(r),
            budgets=budgets, local_price=functools.partial(local_price, monitor),
            hosted_price=catalog.hosted_price, recorder=self.recorder,
        )
        auth = Authenticator(config.callers, config.admin_key_sha256,
                             config.server.metrics_token_sha256)
        # Offerings without their key are no candidates at all (explain says why).
        keyless = {b.name: b.api_key_env for b in catalog.all()
                   if b.route == "hosted" and b.api_key_env and not api_keys.get(b.api_key_env)}
        gateway = Gateway(config, catalog, monitor, dispatcher, auth=auth, budgets=budgets,
                          limiter=limiter, breakers=breakers, recorder=self.recorder,
                          streams=self.streams, keyless=keyless, tracing=self.tracing)
        if reload:
            budgets.reconfigure(config.budget,
                                {n: c.budget for n, c in config.callers.items()})
        self.parts = Parts(config=config, catalog=catalog, monitor=monitor, api_keys=api_keys,
                           budgets=budgets, limiter=limiter, breakers=breakers,
                           dispatcher=dispatcher, auth=auth, gateway=gateway)

    def _engine_started_at(self, name: str) -> float | None:
        """When the supervisor started the engine's running process (monotonic)."""
        sup = self.supervisor
        engine = None if sup is None else sup.engines.get(name)
        return engine.started_at if engine is not None and engine.running else None

    def _engine_note(self, name: str) -> tuple[bool, str] | None:
        """What the supervisor knows of a managed engine (an exit, its log's last lines, a
        port another process holds), for its down reason in /readyz and the dashboard."""
        sup = self.supervisor
        return None if sup is None else sup.note(name)

    async def reload(self, path: str | None = None, *, allow_open: bool = False) -> Config:
        """Re-read models.yaml and swap it in; a file that does not validate raises
        ConfigError and the running config stays. Server settings (address, ledger) keep
        their start values until a restart.

        A file that would turn authentication off (no callers where there were some) or
        drop the admin key is refused unless `allow_open`: a truncated file must not open
        the gateway. Each reload runs whole, one after the other, in a task of its own: a
        caller that goes away mid-reload cannot leave a monitor started and never stopped.
        """
        task = asyncio.ensure_future(self._reload(path, allow_open))
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)
        return await asyncio.shield(task)

    def _reload_done(self, task: asyncio.Task[Config]) -> None:
        self._reloads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone away

    async def _reload(self, path: str | None, allow_open: bool) -> Config:
        async with self._reload_lock:
            if self._stopped:
                raise Unavailable("the gateway is shutting down", code="shutting_down")
            path = path or self.config_path
            cfg = load_config(path)
            cfg = cfg.model_copy(update={"server": self.config.server})
            if not allow_open:
                _refuse_opening(self.config, cfg)
            old_monitor, old_limiter, had_ledger = self.monitor, self.limiter, self.ledger.path
            self._install(cfg, self.breakers, self.budgets)
            # No await since the swap: no request was admitted by the fresh buckets yet.
            self.limiter.inherit(old_limiter)
            assert self.ledger.path == had_ledger
            self.metrics.set_aliases(self.catalog.aliases)
            try:
                await self.monitor.start()
            finally:
                await old_monitor.stop()
            log.info("reloaded %s: %d aliases, %d callers", path, len(cfg.aliases),
                     len(cfg.callers))
            self._warn(cfg)
            return cfg

    async def start(self) -> None:
        await self.upstream.start()
        await self.ledger.start()
        self.budgets.load(self.ledger)
        self.gpu = GpuProbe()
        await self.monitor.start()
        self._warn(self.config)

    def _warn(self, config: Config) -> None:
        missing = sorted(k for k, v in self.api_keys.items() if not v)
        for name in missing:
            log.warning("%s is not set: hosted offerings that need it are skipped", name)
        if self.auth.open:
            log.warning("NO CALLERS CONFIGURED: the gateway is OPEN, every request is served "
                        "without an API key. Add callers to models.yaml (spillover keys add "
                        "NAME) before exposing it beyond this machine.")

    async def stop(self) -> None:
        async with self._reload_lock:  # a reload in progress ends first; none starts after
            self._stopped = True
        await self.monitor.stop()
        await self.upstream.aclose()
        await self.client.aclose()
        await self.ledger.stop()
        if self.gpu is not None:
            self.gpu.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    def hardware(self) -> dict[str, object]:
        """GPUs per local deployment (NVML) and the host (psutil); no GPU is a normal
        state, reported with its reason."""
        host = read_host()
        out: dict[str, object] = {
            "host": {"cpu_percent": host.cpu_percent, "cpu_count": host.cpu_count,
                     "memory_used_bytes": host.memory_used_bytes,
                     "memory_total_bytes": host.memory_total_bytes,
                     "load_average": list(host.load_average)},
        }
        gpu = self.gpu
        if gpu is None or not gpu.available:
            out["gpu"] = {"available": False,
                          "reason": gpu.reason if gpu is not None else "not started"}
            return out
        readings = {r.index: r for r in gpu.read()}
        per_dep: dict[str, list[dict[str, object]]] = {}
        for b in self.catalog.all():
            if b.route == "local":
                per_dep[b.name] = [
                    {"index": i, "utilization_pct": r.utilization_pct,
                     "memory_used_bytes": r.memory_used_bytes,
                     "memory_total_bytes": r.memory_total_bytes,
                     "power_watts": r.power_watts, "age_s": 0.0}
                    for i in (b.gpus or tuple(readings)) if (r := readings.get(i)) is not None
                ]
        out["gpu"] = {"available": True, "count": gpu.device_count, "deployments": per_dep}
        return out

    def readiness(self) -> tuple[bool, dict[str, object]]:
        load = self.monitor.view()
        aliases: dict[str, object] = {}
        ready = True
        for alias, backends in self.catalog.aliases.items():
            usable = []
            for b in backends:
                if b.route == "local":
                    if load[b.name].healthy:
                        usable.append(b.name)
                elif not b.api_key_env or self.api_keys.get(b.api_key_env):
                    usable.append(b.name)
            aliases[alias] = {"ready": bool(usable), "backends": usable}
            ready = ready and bool(usable)
        # A replica refusing calls for want of a ledger is not ready; one that spools is.
        ledger = self.ledger.health.snapshot()
        ready = ready and not ledger["refusing"]
        return ready, {"ready": ready, "aliases": aliases, "engines": self.monitor.status(),
                       "ledger": ledger, **self.hardware()}

    def status(self) -> dict[str, object]:
        _, detail = self.readiness()
        sup = self.supervisor
        managed = [] if sup is None else [dataclasses.asdict(s) for s in sup.status()]
        return {**detail, "now": time.time(), "managed_engines": managed,
                "open": self.auth.open, "budgets": self.budgets.snapshot(),
                "breakers": self.breakers.snapshot(), "recent": list(self.recorder.recent),
                "series": self.recorder.series(), "today": self.recorder.today(),
                "apis": self.recorder.apis(),
                "tiers": {**self.recorder.tiers(), "aliases": {
                    n: list(a.tiers) for n, a in self.config.aliases.items()
                    if a.tiers is not None}}}


def local_price(monitor: LoadMonitor, b: Backend) -> Price | None:
    """What a local token costs: the GPU's hourly cost over the throughput the engine
    delivers now (by the monitor of the parts the call started with). Charged on output
    tokens, which is where the GPU time goes."""
    rate = local_cost_per_mtok(b.gpu_hour_usd, monitor.tokens_per_s(b.name))
    return None if rate is None else Price(input_per_mtok=0.0, output_per_mtok=rate)


def _refuse_opening(running: Config, new: Config) -> None:
    """What a reload must not do without the operator saying so (allow_open)."""
    problems = []
    if running.callers and not new.callers:
        problems.append("it has no callers, so the gateway would serve everyone without a key")
    if running.admin_key_sha256 and not new.admin_key_sha256:
        problems.append("it has no admin_key_sha256, so the admin endpoints would be "
                        "disabled or, with no callers, open to everyone")
    if problems:
        raise InvalidRequest(
            "the new models.yaml would open the gateway: " + " and ".join(problems)
            + "; the running config stays. Reload with allow_open=true (POST "
            "/admin/reload?allow_open=true, or `spillover serve --allow-open-reload` for "
            "SIGHUP) if that is intended", param="allow_open", code="reload_opens_gateway")
