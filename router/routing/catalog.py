"""Alias -> its backends in preference order: local deployments, then hosted offerings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from router.config import Config, Endpoint, License, Price, Saturation, Timeouts

Route = Literal["local", "hosted"]
Flavour = Literal["vllm", "mistral", "openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One place a request for an alias can be served, with everything routing reads."""

    name: str  # unique: the deployment name, or "provider:model"
    label: str  # x-spillover-backend: deployment or provider name from models.yaml
    route: Route
    alias: str
    model_id: str
    base_url: str
    flavour: Flavour
    api_key_env: str | None
    endpoints: frozenset[Endpoint]
    timeouts: Timeouts
    license_id: str | None = None
    license: License | None = None
    price: Price | None = None
    batch_price: Price | None = None  # hosted, for batch lines
    context_length: int | None = None
    saturation: Saturation | None = None
    gpus: tuple[int, ...] = ()
    gpu_hour_usd: float = 0.0
    # A DNS name whose every address at `port` is a replica (LocalDeployment.discover).
    discover: str | None = None
    port: int | None = None
    # A local engine run with vLLM's priority scheduling: requests carry their class's
    # vLLM priority (an engine without it must not be sent one).
    priority_scheduling: bool = False

    @property
    def batch_line(self) -> float:
        """The load ratio below which a batch request is admitted here (1.0: no line, a
        backend without saturation limits). `saturation.batch_below` when set; else 0.9 on
        an engine that schedules by priority, where the more urgent classes are admitted
        without counting batch requests and served first, so the headroom only bounds the
        compute batch work takes (which the adaptive batch concurrency watches), and 0.75
        on a first-come-first-served one, where batch requests queue ahead of interactive
        ones (README, Batch API benchmark)."""
        if self.saturation is None:
            return 1.0
        if self.saturation.batch_below is not None:
            return self.saturation.batch_below
        return 0.9 if self.priority_scheduling else 0.75


class Catalog:
    def __init__(self, config: Config) -> None:
        self._by_alias: dict[str, tuple[Backend, ...]] = {}
        self._by_name: dict[str, Backend] = {}
        # Tiered aliases have no backends of their own: router.routing.tiers picks one of
        # their tiers, a plain alias, for each request.
        self.tiered: dict[str, tuple[str, ...]] = {
            name: tuple(alias.tiers) for name, alias in config.aliases.items()
            if alias.tiers is not None}
        for alias_name, alias in config.aliases.items():
            if alias.tiers is not None:
                continue
            backends: list[Backend] = []
            for dep in alias.local:
                backends.append(
                    Backend(
                        name=dep.name,
                        label=dep.name,
                        route="local",
                        alias=alias_name,
                        model_id=dep.model_id(alias_name),
                        base_url=dep.url,
                        flavour="vllm",
                        api_key_env=None,
                        endpoints=frozenset(dep.endpoints),
                        timeouts=dep.timeouts,
                        license_id=dep.license,
                        license=config.licenses[dep.license],
                        context_length=dep.max_model_len,
                        saturation=dep.saturation,
                        gpus=tuple(dep.gpus),
                        gpu_hour_usd=dep.gpu_hour_usd,
                        priority_scheduling=dep.engine_scheduling == "priority",
                        discover=dep.discover,
                        port=dep.port,
                    )
                )
            for off in alias.hosted:
                prov = config.providers[off.provider]
                backends.append(
                    Backend(
                        name=f"{off.provider}:{off.model}",
                        label=off.provider,
                        route="hosted",
                        alias=alias_name,
                        model_id=off.model,
                        base_url=prov.base_url.rstrip("/"),
                        flavour=prov.kind,
                        api_key_env=prov.api_key_env,
                        endpoints=frozenset(off.endpoints),
                        timeouts=prov.timeouts,
                        price=off.price,
                        batch_price=off.batch_price,
                        context_length=off.context_length,
                    )
                )
            self._by_alias[alias_name] = tuple(backends)
            for b in backends:
                self._by_name[b.name] = b

    @property
    def aliases(self) -> Mapping[str, tuple[Backend, ...]]:
        return self._by_alias

    def listed(self) -> list[str]:
        """Every alias a caller may name: plain and tiered."""
        return [*self._by_alias, *self.tiered]

    def backends(self, alias: str) -> tuple[Backend, ...] | None:
        return self._by_alias.get(alias)

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def all(self) -> list[Backend]:
        return list(self._by_name.values())

    def hosted_price(self, alias: str) -> Price | None:
        """The price the alias would have cost hosted: its first hosted offering's."""
        for b in self._by_alias.get(alias, ()):
            if b.price is not None:
                return b.price
        return None
