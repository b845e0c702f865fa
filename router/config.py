"""models.yaml as pydantic models: every problem is reported with its place in the file."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = "models.yaml"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
_DNS_NAME = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
# The principals router.routing.auth builds itself: the admin key's, and the keyless one of open
# mode. A caller under one of these names would share their ledger rows, usage and limits.
RESERVED_CALLER_NAMES = ("admin", "anonymous")


class _Strict(BaseModel):
    # A typo in models.yaml must be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class License(_Strict):
    title: str
    commercial: bool
    url: str | None = None


class Price(_Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        total = prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        return total / 1e6


class Saturation(_Strict):
    """When a local engine counts as full. Any one limit reached saturates it."""

    max_waiting: int = Field(default=0, ge=0)
    max_running: int | None = Field(default=None, ge=1)
    max_kv_cache: float = Field(default=0.9, gt=0, le=1)
    max_inflight: int = Field(default=16, ge=1)
    # Hysteresis: once saturated, accept again only when every load ratio is below this.
    resume_below: float = Field(default=0.7, gt=0, le=1)
    # Batch-class requests are admitted only while every load ratio is below this line
    # (interactive ones up to the limits above): the rest is headroom kept for
    # interactive traffic. The Batch API's lines run below it at the engine's adaptive
    # batch concurrency (batches.interactive_ttft_slo_ms), so it is their hard ceiling,
    # not their operating point: at 0.5, interactive requests in flight alone kept the
    # batch out of most of the capacity they left (README, Batch API bench).
    # Unset: Backend.batch_line's default for the engine's scheduling policy.
    batch_below: float | None = Field(default=None, gt=0, le=1)


class Timeouts(_Strict):
    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=120.0, gt=0)
    write: float = Field(default=30.0, gt=0)
    pool: float = Field(default=5.0, gt=0)


Endpoint = Literal["chat", "completions", "fim", "embeddings"]
_LOCAL_ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions")
_HOSTED_ENDPOINTS: tuple[Endpoint, ...] = ("chat",)


Mode = Literal["latency-first", "cost-first"]
Use = Literal["commercial", "research"]
# Traffic classes, most urgent first: a request may be lowered to a later class, never
# raised past its caller's ceiling.
Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "standard", "batch")


class Budget(_Strict):
    """Hosted spend limits in USD; None means no limit."""

    daily_usd: float | None = Field(default=None, ge=0)
    monthly_usd: float | None = Field(default=None, ge=0)


class GlobalBudget(Budget):
    """The hosted budget of everyone together, and what one request or caller may hold."""

    # The most one request may reserve (its worst case); above it the request does not go
    # hosted. None: no ceiling beyond the budgets.
    max_request_usd: float | None = Field(default=None, gt=0)
    # The fraction of the global daily and monthly budgets one caller may spend and hold,
    # so no caller can take the shared budget hostage. None: the whole of it.
    max_caller_share: float | None = Field(default=None, gt=0, le=1)


class RateLimit(_Strict):
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class Caller(_Strict):
    """An internal app (tenant): how it is recognised and what it may do."""

    # sha256 hex digests of its API keys; the keys themselves are never stored.
    key_sha256: list[str] = Field(default_factory=list)
    use: Use = "commercial"
    residency: Literal["any", "onprem"] = "any"
    aliases: list[str] | None = None  # None: every alias
    mode: Mode | None = None  # None: the alias's mode
    max_request_usd: float | None = Field(default=None, gt=0)
    budget: Budget = Field(default_factory=Budget)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    may_force_route: bool = True
    # Streams this caller may hold open at once; beyond it 429 too_many_streams. A stream
    # holds an engine slot, an upstream connection and buffers for as long as its reader
    # takes, so a few slow readers must not take the router from everyone. None: no cap.
    max_concurrent_streams: int | None = Field(default=128, ge=1)
    # Tiered aliases: whether x-spillover-tier may pin a tier, and the highest tier (1 =
    # the first, everyday one) this caller may reach, whatever the score (None: any).
    may_pin_tier: bool = False
    max_tier: int | None = Field(default=None, ge=1)
    # The most urgent traffic class this caller may use, and the class of its requests
    # that name none (None: max_priority). x-spillover-priority may lower it, never raise.
    max_priority: Priority = "interactive"
    priority: Priority | None = None

    @model_validator(mode="after")
    def _priority_within_ceiling(self) -> Caller:
        if self.priority is not None and (PRIORITIES.index(self.priority)
                                          < PRIORITIES.index(self.max_priority)):
            raise ValueError(f"priority {self.priority!r} is above max_priority "
                             f"{self.max_priority!r}")
        return self

    @property
    def default_priority(self) -> Priority:
        return self.priority or self.max_priority


class Routing(_Strict):
    mode: Mode = "latency-first"
    # cost-first: how long a request may wait for a local engine before it spills.
    cost_first_max_wait_s: float = Field(default=2.0, ge=0)
    # on-prem-only requests: how long they wait for local capacity before a 503.
    residency_max_wait_s: float = Field(default=10.0, ge=0)
    # batch-class requests: how long they wait for local headroom before a 503 (they are
    # never sent hosted at the interactive price).
    batch_max_wait_s: float = Field(default=10.0, ge=0)
    # Retries of one upstream before the next target; backoff capped and jittered.
    attempts_per_target: int = Field(default=2, ge=1, le=10)
    backoff_initial_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=4.0, ge=0)
    retry_after_cap_s: float = Field(default=20.0, ge=0)
    # Output tokens a request without max_tokens may generate: hosted calls are sent this
    # max_tokens, and budgets and tokens-per-minute limits charge it as the worst case.
    default_max_tokens: int = Field(default=4096, ge=1)
    # Circuit breaker per upstream.
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)


class LocalDeployment(_Strict):
    name: str = Field(pattern=_NAME)
    model: str
    license: str
    served_model_name: str | None = None
    # Managed engines are started by spillover on host:port; set base_url for one run elsewhere.
    base_url: str | None = None
    # Or a DNS name whose every address is a replica of this deployment (a Kubernetes
    # headless Service): the router resolves it periodically, each address at `port`.
    discover: str | None = Field(default=None, pattern=_DNS_NAME)
    # Engine replicas `spillover deploy k8s` runs (one managed engine otherwise).
    replicas: int = Field(default=1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8101, ge=1, le=65535)
    max_model_len: int | None = Field(default=None, ge=16)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpus: list[int] = Field(default_factory=list)
    extra_args: list[str] = Field(default_factory=list)
    # vLLM's --scheduling-policy. "priority" lets an interactive request pass queued batch
    # work (each request carries its class's vLLM priority). None: "priority" for the
    # engines spillover starts or deploys, "fcfs" for one at base_url (started by someone
    # else: set "priority" here once it runs with --scheduling-policy priority).
    scheduling_policy: Literal["priority", "fcfs"] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    endpoints: list[Endpoint] = Field(default_factory=lambda: list(_LOCAL_ENDPOINTS))
    saturation: Saturation = Field(default_factory=Saturation)
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts(connect=1.0, read=300.0))
    # What the GPUs of this deployment cost an hour (amortised hardware + power); with the
    # throughput the engine delivers it gives the local cost per token.
    gpu_hour_usd: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_place(self) -> LocalDeployment:
        if self.base_url is not None and self.discover is not None:
            raise ValueError("base_url and discover exclude each other: one engine at a URL, "
                             "or every address a DNS name resolves to")
        return self

    @property
    def managed(self) -> bool:
        return self.base_url is None and self.discover is None

    @property
    def url(self) -> str:
        host = self.discover or self.host
        return (self.base_url or f"http://{host}:{self.port}/v1").rstrip("/")

    def model_id(self, alias: str) -> str:
        return self.served_model_name or alias

    @property
    def engine_scheduling(self) -> Literal["priority", "fcfs"]:
        return self.scheduling_policy or ("fcfs" if self.base_url is not None else "priority")


class HostedOffering(_Strict):
    provider: str
    model: str
    price: Price
    # What the offering costs for batch work (the lines of /v1/batches a deadline sends to
    # hosted); None: the ordinary price. La Plateforme bills its Batch API at 50% of the
    # per-token price (https://docs.mistral.ai/capabilities/batch/, https://mistral.ai/pricing).
    batch_price: Price | None = None
    endpoints: list[Endpoint] = Field(default_factory=lambda: list(_HOSTED_ENDPOINTS))
    context_length: int | None = Field(default=None, ge=16)

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.model}"


class ScorerWeights(_Strict):
    """What each feature of the default tier scorer adds to the score at most (its value,
    from 0 to 1, times its weight); the score is their sum, capped at 1."""

    prompt_tokens: float = Field(default=0.35, ge=0, le=1)
    conversation_depth: float = Field(default=0.15, ge=0, le=1)
    # Tools say "agent", not "hard": their count alone must stay below the top threshold
    # (spillover check refuses a weight that would let it reach it).
    tools: float = Field(default=0.10, ge=0, le=1)
    response_schema: float = Field(default=0.25, ge=0, le=1)
    code_blocks: float = Field(default=0.20, ge=0, le=1)
    reasoning: float = Field(default=0.35, ge=0, le=1)
    requested_length: float = Field(default=0.20, ge=0, le=1)


class ScorerScales(_Strict):
    """Where each feature reaches its full value (1)."""

    prompt_tokens: int = Field(default=4000, ge=1)  # message text, tool definitions excluded
    conversation_depth: int = Field(default=8, ge=1)  # user turns
    tools: int = Field(default=16, ge=1)
    code_blocks: int = Field(default=2, ge=1)
    reasoning: int = Field(default=3, ge=1)  # distinct reasoning / multi-step markers
    requested_length: int = Field(default=4096, ge=1)  # max_tokens


class Scorer(_Strict):
    weights: ScorerWeights = Field(default_factory=ScorerWeights)
    scales: ScorerScales = Field(default_factory=ScorerScales)
    # A learned scorer: "package.module:function", called with a router.routing.tiers.
    # RequestView and returning a score in [0, 1]; loaded at start. A failure, a result
    # out of range or a call over timeout_ms falls back to the default scorer.
    plugin: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    timeout_ms: float = Field(default=5.0, gt=0, le=1000)


class Cascade(_Strict):
    """Non-streamed answers of a lower tier that say it failed are re-sent one tier up."""

    enabled: bool = True
    json_schema: bool = True  # the answer does not validate against response_format's schema
    tool_calls: bool = True  # tool arguments that are not JSON, or a tool not offered
    length: bool = True  # finish_reason "length" below the requested max_tokens


class Alias(_Strict):
    description: str | None = None
    mode: Mode | None = None  # None: routing.mode
    local: list[LocalDeployment] = Field(default_factory=list)
    hosted: list[HostedOffering] = Field(default_factory=list)
    # A tiered alias: other aliases, everyday first, and the scores between them.
    tiers: list[str] | None = None
    thresholds: list[float] = Field(default_factory=list)
    scorer: Scorer = Field(default_factory=Scorer)
    # Once escalated, a conversation stays at least at that tier this long (0: never).
    sticky_s: float = Field(default=900.0, ge=0)
    cascade: Cascade = Field(default_factory=Cascade)
    # A tier chosen whose plan is refused (no key for the flagship, residency, budget):
    # "lower" serves the request on the highest tier below that can, "refuse" answers
    # the refusal.
    unusable_tier: Literal["lower", "refuse"] = "lower"

    @model_validator(mode="after")
    def _has_backend(self) -> Alias:
        if self.tiers is not None:
            if self.local or self.hosted:
                raise ValueError("a tiered alias names other aliases in 'tiers'; it has no "
                                 "local deployments or hosted offerings of its own")
            return self
        if not self.local and not self.hosted:
            raise ValueError("an alias needs at least one local deployment or hosted offering")
        return self


class Provider(_Strict):
    base_url: str
    api_key_env: str | None = None
    # How requests are translated: "mistral" for La Plateforme, "openai" for plain ones,
    # "anthropic" for Anthropic's Messages API (x-api-key auth, chat translated to Messages).
    kind: Literal["mistral", "openai", "anthropic"] = "openai"
    timeouts: Timeouts = Field(default_factory=Timeouts)


class Server(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Bounds on a connection before it has sent a request (router/http/server.py): the request
    # line and headers (431 above), the time to receive them (408, or a close if nothing
    # came), and how long an idle keep-alive connection stays open between requests.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_s: int = Field(default=5, ge=1)
    # Every request ends within this, whatever its upstreams do.
    request_timeout_s: float = Field(default=300.0, gt=0)
    metrics_interval_s: float = Field(default=0.5, gt=0)
    metrics_stale_s: float = Field(default=5.0, gt=0)
    # How often local deployments' `discover` names are resolved again (replicas come, go).
    discover_interval_s: float = Field(default=5.0, gt=0)
    engine_start_timeout_s: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=512, ge=1)
    # Idle connections the httpx client keeps (engine probes, injected test transports).
    # httpx scans every pooled connection on each request, so a large idle pool costs CPU
    # on every call; the hot path's aiohttp pool does not (max_connections bounds it).
    max_keepalive_connections: int = Field(default=32, ge=0)
    log_dir: str = ".spillover/logs"
    # One row per call (SQLite, WAL). Budgets read their spend from it at start, so a
    # restart forgets nothing. ":memory:" keeps it in this process only.
    ledger_path: str = ".spillover/ledger.db"
    # The NAME of an environment variable holding a postgresql:// URL (the URL carries a
    # password, so it never lives in this file). When set, the ledger and the budgets live
    # in that database, shared by every replica pointed at it, and ledger_path is unused.
    database_url_env: str | None = Field(default=None, min_length=1)
    # A ledger store that fails (a full disk, PostgreSQL down): "spool" keeps serving and
    # keeps the rows of answered calls in ledger_spool_dir (fsync'd, at most
    # ledger_spool_max_bytes; put it on another disk than the SQLite ledger) until the
    # store answers; "refuse" answers new calls 503 rather than serve calls nobody can bill.
    # Either way a spool that is full or cannot be written refuses new calls too.
    ledger_failure: Literal["spool", "refuse"] = "spool"
    ledger_spool_dir: str = ".spillover/spool"
    ledger_spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    # How often a failed store is tried again (and the spool written to it).
    ledger_retry_s: float = Field(default=2.0, gt=0)
    # GET /metrics names callers with their spend: by default only the admin key (or, in
    # open mode without one, anyone) reads it. Prometheus can send a token of its own
    # (sha256 digests here, like callers' keys), or the operator opens it entirely.
    metrics_public: bool = False
    metrics_token_sha256: list[str] = Field(default_factory=list)


DEFAULT_LICENSES: dict[str, License] = {
    "apache-2.0": License(title="Apache License 2.0", commercial=True),
    "mrl": License(title="Mistral Research License", commercial=False),
    "mnpl": License(title="Mistral AI Non-Production License", commercial=False),
}


# Mistral weights that may not be used commercially, by the name of their release (the
# Hugging Face id or the directory they were downloaded into). Declaring one of these
# under a commercial licence is refused: the licence decides who may use local capacity.
KNOWN_NONCOMMERCIAL: dict[str, str] = {
    "mistral-large-instruct-2407": "Mistral Research License",
    "mistral-large-instruct-2411": "Mistral Research License",
    "ministral-8b-instruct-2410": "Mistral Research License",
    "codestral-22b-v0.1": "Mistral AI Non-Production License",
}


class Batches(_Strict):
    """The Batch API (/v1/files, /v1/batches): where the files live, their bounds, and how
    the scheduler feeds the lines."""

    # Uploaded and result files; None: a "batches" folder beside the SQLite ledger.
    data_dir: str | None = None
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_lines: int = Field(default=50_000, ge=1)
    # A line's body above this is refused with its line number (as OpenAI does).
    max_line_bytes: int = Field(default=1024 * 1024, ge=256)
    # Lines of one batch in flight at once on the local engines: a cap below which each
    # engine's adaptive batch concurrency decides (and routing's saturation.batch_below per
    # request). None: each engine's batch line in requests (batch_below x max_inflight),
    # so batch work can fill an engine of any size up to its line; a fixed 16 left a
    # 36-request engine's batch line (27) mostly unused while hosted took the rest.
    local_concurrency: int | None = Field(default=None, ge=1)
    # A safety bound, not the pacing: the plan sends hosted only what the deadline forces,
    # at the latest safe tick, so a higher cap sends no more lines, only lets hosted absorb
    # a local pace that collapsed late. 32: hosted APIs take that many calls at once within
    # ordinary rate limits, and at 8 a batch whose engine slowed expired while the plan
    # asked for more (README, Batch API bench).
    hosted_concurrency: int = Field(default=32, ge=1)
    # Share of the time left kept in reserve: hosted gets what the local pace will not
    # finish by the deadline less this share, from the latest tick at which hosted (at
    # hosted_concurrency) can still finish it.
    deadline_margin: float = Field(default=0.2, ge=0, lt=1)
    # The interactive time to first token the batch's local lines must not push past:
    # each engine's batch concurrency is cut as the p90 of its local interactive TTFTs
    # over the last 5 s (at least 10 of them) nears it (0.7 of it), never on one slow
    # request, and grows while that p90 stays under half of it.
    interactive_ttft_slo_ms: float = Field(default=1000.0, gt=0)
    # A hosted line's duration assumed until the batch has measured its own: a high guess
    # starts hosted earlier and keeps a longer reserve before the deadline (at most
    # deadline_margin of the window).
    hosted_latency_s: float = Field(default=10.0, gt=0)
    # How often the scheduler looks for new batches and re-plans running ones.
    poll_s: float = Field(default=0.5, gt=0)


class Config(_Strict):
    server: Server = Field(default_factory=Server)
    batches: Batches = Field(default_factory=Batches)
    routing: Routing = Field(default_factory=Routing)
    budget: GlobalBudget = Field(default_factory=GlobalBudget)  # global hosted spend
    callers: dict[str, Caller] = Field(default_factory=dict)
    admin_key_sha256: list[str] = Field(default_factory=list)
    licenses: dict[str, License] = Field(default_factory=lambda: dict(DEFAULT_LICENSES))
    providers: dict[str, Provider] = Field(default_factory=dict)
    aliases: dict[str, Alias]

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems: list[str] = []
        seen: dict[str, str] = {}
        ports: dict[tuple[str, int], str] = {}
        for alias_name, alias in self.aliases.items():
            if not re.match(_NAME, alias_name):
                problems.append(f"aliases.{alias_name}: not a valid alias name")
            for i, dep in enumerate(alias.local):
                where = f"aliases.{alias_name}.local.{i}"
                if dep.license not in self.licenses:
                    problems.append(
                        f"{where}.license: unknown licence {dep.license!r} "
                        f"(known: {', '.join(sorted(self.licenses))})"
                    )
                release = dep.model.rstrip("/").rsplit("/", 1)[-1].lower()
                known = KNOWN_NONCOMMERCIAL.get(release)
                lic = self.licenses.get(dep.license)
                if known and lic is not None and lic.commercial:
                    problems.append(
                        f"{where}.license: {dep.model} is under the {known}, which does not "
                        f"allow commercial use, but {dep.license!r} says it does"
                    )
                if dep.name in seen:
                    problems.append(f"{where}.name: {dep.name!r} already used in {seen[dep.name]}")
                seen[dep.name] = where
                if any(a.split("=", 1)[0] == "--scheduling-policy" for a in dep.extra_args):
                    problems.append(f"{where}.extra_args: set scheduling_policy instead of "
                                    "--scheduling-policy (routing reads it)")
                if dep.managed:
                    key = (dep.host, dep.port)
                    if key in ports:
                        problems.append(f"{where}.port: {dep.port} already used by {ports[key]}")
                    ports[key] = dep.name
                    if dep.port == self.server.port:
                        problems.append(f"{where}.port: {dep.port} is the router's own port")
            for i, off in enumerate(alias.hosted):
                if off.provider not in self.providers:
                    problems.append(
                        f"aliases.{alias_name}.hosted.{i}.provider: unknown provider "
                        f"{off.provider!r} (known: {', '.join(sorted(self.providers)) or 'none'})"
                    )
        for provider_name in self.providers:
            # The name travels in response headers (x-spillover-backend), which HTTP/1.1
            # carries as latin-1: anything outside the plain name alphabet is refused here.
            if not re.match(_NAME, provider_name):
                problems.append(f"providers.{provider_name}: not a valid provider name "
                                "(letters, digits, '.', '_', ':', '-')")
        for j, digest in enumerate(self.server.metrics_token_sha256):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                problems.append(f"server.metrics_token_sha256.{j}: not a sha256 hex digest "
                                "(spillover keys add)")
        owners: dict[str, str] = {}
        for name, caller in self.callers.items():
            if name.casefold() in RESERVED_CALLER_NAMES:
                problems.append(f"callers.{name}: the name {name!r} is reserved (the "
                                f"{'admin key' if name.casefold() == 'admin' else 'keyless caller'}"
                                " of the gateway), choose another")
            for j, digest in enumerate(caller.key_sha256):
                where = f"callers.{name}.key_sha256.{j}"
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    problems.append(f"{where}: not a sha256 hex digest (spillover keys add)")
                elif digest in owners:
                    problems.append(f"{where}: the same key is already {owners[digest]}'s")
                owners[digest] = name
            for alias_name in caller.aliases or ():
                if alias_name not in self.aliases:
                    problems.append(f"callers.{name}.aliases: unknown alias {alias_name!r}")
        problems += self._tier_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _tier_problems(self) -> list[str]:
        problems: list[str] = []
        for name, alias in self.aliases.items():
            if alias.tiers is None:
                continue
            where = f"aliases.{name}"
            if len(alias.tiers) < 2:
                problems.append(f"{where}.tiers: a tiered alias needs at least two tiers")
            for i, tier in enumerate(alias.tiers):
                target = self.aliases.get(tier)
                if target is None:
                    problems.append(f"{where}.tiers.{i}: unknown alias {tier!r}")
                elif target.tiers is not None:
                    cycle = _tier_cycle(self.aliases, name)
                    problems.append(
                        f"{where}.tiers.{i}: " + (
                            f"tiers form a cycle ({' -> '.join(cycle)})" if cycle else
                            f"{tier!r} is itself tiered (a tier must be a plain alias)"))
            if len(set(alias.tiers)) != len(alias.tiers):
                problems.append(f"{where}.tiers: the same alias is named twice")
            t = alias.thresholds
            if len(t) != len(alias.tiers) - 1:
                problems.append(f"{where}.thresholds: {len(alias.tiers)} tiers need "
                                f"{max(0, len(alias.tiers) - 1)} thresholds, not {len(t)}")
            for i, value in enumerate(t):
                if not 0 < value <= 1:
                    problems.append(f"{where}.thresholds.{i}: {value} is not in (0, 1]")
                elif i and value <= t[i - 1]:
                    problems.append(f"{where}.thresholds.{i}: {value} is not above the "
                                    f"threshold before it ({t[i - 1]}); thresholds go up")
            if t and alias.scorer.weights.tools >= t[-1]:
                problems.append(
                    f"{where}.scorer.weights.tools: {alias.scorer.weights.tools} would let "
                    f"the tool count alone reach the top tier (threshold {t[-1]})")
        return problems

    def deployments(self) -> Iterable[tuple[str, LocalDeployment]]:
        for alias_name, alias in self.aliases.items():
            for dep in alias.local:
                yield alias_name, dep


def _tier_cycle(aliases: Mapping[str, Alias], start: str) -> list[str] | None:
    """The names of a cycle through tiered aliases that starts at `start`, if any."""
    path = [start]

    def walk(name: str) -> list[str] | None:
        for tier in aliases[name].tiers or ():
            nxt = aliases.get(tier)
            if nxt is None or nxt.tiers is None:
                continue
            if tier == start:
                return [*path, tier]
            if tier in path:
                continue
            path.append(tier)
            if (found := walk(tier)) is not None:
                return found
            path.pop()
        return None

    return walk(start)


@dataclass(frozen=True, slots=True)
class Problem:
    location: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.location}: {self.message}"


class ConfigError(Exception):
    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(str(p) for p in problems))


def config_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return explicit or env.get("SPILLOVER_CONFIG") or DEFAULT_CONFIG


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [Problem("", None, f"cannot read: {exc.strerror}")]) from exc
    return parse_config(text, str(p))


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [Problem("", line, f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", 1, "the file must be a mapping with 'aliases'")])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc, root)) from exc


def _problems(exc: ValidationError, root: yaml.Node | None) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors():
        loc = [p for p in err["loc"]]
        msg = err["msg"]
        if err["type"] == "value_error" and not loc:
            # Cross-reference errors carry their own dotted locations.
            for part in str(err["ctx"].get("error", msg)).split("; "):
                where, _, text = part.partition(": ")
                path = [int(s) if s.isdigit() else s for s in where.split(".")]
                out.append(Problem(where, _line(root, path), text))
            continue
        where = ".".join(str(p) for p in loc)
        out.append(Problem(where, _line(root, loc), msg.removeprefix("Value error, ")))
    return out


def _line(node: yaml.Node | None, path: list[Any]) -> int | None:
    """1-based line of the deepest node of `path` that exists in the YAML tree."""
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for key in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    child = v
                    line = k.start_mark.line + 1
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(key, int)
              and 0 <= key < len(node.value)):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


# A Hugging Face repository id: "name" or "org/name" (letters, digits, ".", "_", "-").
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# What a weights directory vLLM can serve holds: Hugging Face's config or Mistral's params.
_MODEL_FILES = ("config.json", "params.json")


def looks_local(model: str, cwd: Path) -> bool:
    """Whether `model` names a path on this machine rather than a hub repository id.

    Paths: anything starting with "/", "." or "~", anything that is not a valid hub id
    (two slashes, spaces), and anything that exists. "org/name" whose "org" is a directory
    here is a path with a typo, not a repository (vLLM would try the hub and fail offline).
    """
    if model.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(model):
        return True
    if (cwd / model).exists():
        return True
    return "/" in model and (cwd / model.split("/", 1)[0]).is_dir()


def model_path_problem(model: str, cwd: Path) -> str | None:
    """Why a local model path cannot be served, or None (also for hub ids)."""
    if not looks_local(model, cwd):
        return None
    path = Path(model).expanduser()
    full = path if path.is_absolute() else cwd / path
    if not full.exists():
        where = "" if path.is_absolute() else f" (relative to {cwd}, where spillover runs)"
        return f"{model} does not exist{where}"
    if full.is_file():
        return None if full.suffix == ".gguf" else f"{model} is a file, not a model directory"
    if not any((full / name).is_file() for name in _MODEL_FILES):
        return f"{model} holds no model (no {' or '.join(_MODEL_FILES)})"
    return None


def model_path_problems(cfg: Config, path: str | os.PathLike[str],
                        cwd: Path | None = None) -> list[Problem]:
    """Managed local deployments whose model is a path that holds no model, each with its
    line in the file at `path` (which cfg was loaded from). Engines run where spillover runs,
    so relative paths are checked from cwd (default: the current directory)."""
    cwd = Path.cwd() if cwd is None else cwd
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        root = None
    out: list[Problem] = []
    for alias_name, alias in cfg.aliases.items():
        for i, dep in enumerate(alias.local):
            if not dep.managed or (why := model_path_problem(dep.model, cwd)) is None:
                continue
            loc: list[Any] = ["aliases", alias_name, "local", i, "model"]
            out.append(Problem(".".join(map(str, loc)), _line(root, loc), why))
    return out
