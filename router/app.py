"""The app factory: everything the gateway needs is built here and owned by the lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI

from router.api import build_routes, install_error_handlers
from router.catalog import Catalog
from router.config import Config, load_config
from router.dispatch import Dispatcher
from router.gateway import Gateway
from router.providers import translator_for
from router.signals import LoadMonitor

log = logging.getLogger("spillover")


@dataclass(frozen=True)
class Settings:
    config_path: str = "models.yaml"
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class Runtime:
    """The running gateway's parts; created by `create_app`, started by its lifespan."""

    def __init__(self, config: Config, env: Mapping[str, str],
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.catalog = Catalog(config)
        server = config.server
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0),
            limits=httpx.Limits(max_connections=server.max_connections,
                                max_keepalive_connections=server.max_connections,
                                keepalive_expiry=30.0),
            trust_env=False,  # a proxy set for the shell must not capture loopback engines
        )
        self.monitor = LoadMonitor(self.client, self.catalog.all(),
                                   interval_s=server.metrics_interval_s,
                                   stale_s=server.metrics_stale_s)
        key_envs = {p.api_key_env for p in config.providers.values() if p.api_key_env}
        self.api_keys = {name: env.get(name) for name in key_envs}
        translators = {b.name: translator_for(b.flavour) for b in self.catalog.all()}
        self.dispatcher = Dispatcher(self.client, self.monitor, translators, self.api_keys)
        self.gateway = Gateway(config, self.catalog, self.monitor, self.dispatcher)

    async def start(self) -> None:
        await self.monitor.start()
        missing = sorted(k for k, v in self.api_keys.items() if not v)
        for name in missing:
            log.warning("%s is not set: hosted offerings that need it are skipped", name)

    async def stop(self) -> None:
        await self.monitor.stop()
        await self.client.aclose()

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
        return ready, {"ready": ready, "aliases": aliases, "engines": self.monitor.status()}


def create_app(
    settings: Settings | None = None,
    *,
    config: Config | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    settings = settings or Settings()
    cfg = config or load_config(settings.config_path)
    runtime = Runtime(cfg, settings.env, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="spillover", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(build_routes(runtime))
    return app
