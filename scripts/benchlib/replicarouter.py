"""`uvicorn benchlib.replicarouter:app --factory --app-dir scripts`: the router built from
$SPILLOVER_CONFIG, whose `discover` names resolve to $BENCH_REPLICAS (comma-separated
addresses) instead of asking DNS: several engines on one machine, on loopback addresses
that share a port, stand in for the pods behind a headless Service.

BENCH_AFFINITY=0 withholds every request's conversation key from replica selection, so
each request goes to the least-loaded replica: the same router without affinity, the
baseline of scripts/bench_affinity.py.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from router.app import Settings, create_app
from router.routing import load
from router.routing.replicas import Choice


def app() -> FastAPI:
    addresses = [a.strip() for a in os.environ["BENCH_REPLICAS"].split(",") if a.strip()]

    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    if os.environ.get("BENCH_AFFINITY", "1") == "0":
        keyed = load.LoadMonitor.pick

        def least_loaded(self: load.LoadMonitor, name: str,
                         key: str | None = None) -> tuple[str, str, Choice] | None:
            return keyed(self, name, None)

        load.LoadMonitor.pick = least_loaded  # type: ignore[method-assign]
    return create_app(Settings(config_path=os.environ["SPILLOVER_CONFIG"]), resolver=resolve)
