"""The app factory: everything the gateway needs is built here and owned by the lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI

from router.accounting.batches import open_batch_store
from router.accounting.storage import database_target
from router.config import Config, load_config
from router.http.batches import batch_routes
from router.http.dashboard import dashboard_routes
from router.http.errors import install_error_handlers
from router.http.fastlane import FastLaneApp
from router.http.routes import build_routes
from router.routing.batch_scheduler import BatchScheduler, Parts
from router.routing.replicas import Resolver
from router.routing.tracing import Tracing
from router.runtime import Runtime

log = logging.getLogger("spillover")


@dataclass(frozen=True)
class Settings:
    config_path: str = "models.yaml"
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def create_app(
    settings: Settings | None = None,
    *,
    config: Config | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    settings = settings or Settings()
    cfg = config or load_config(settings.config_path)
    runtime = Runtime(cfg, settings.env, transport, config_path=settings.config_path,
                      resolver=resolver, tracing=tracing)

    batches = open_batch_store(cfg, database_target(cfg.server, settings.env))

    def parts() -> Parts:
        p = runtime.parts
        return Parts(p.config, p.catalog, p.monitor, p.gateway, runtime.client, p.api_keys)

    scheduler = BatchScheduler(batches, parts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()
            await runtime.stop()
            batches.close()

    app = FastLaneApp(gateway=lambda: runtime.parts.gateway, title="spillover", version="0.1.0",
                      lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.runtime = runtime  # for tests and operators' tooling, never read by routes
    install_error_handlers(app)
    app.include_router(build_routes(runtime))
    app.include_router(batch_routes(runtime, batches, scheduler))
    app.include_router(dashboard_routes())
    return app
