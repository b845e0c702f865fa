"""`uvicorn benchlib.routerapp:app --factory --workers N --app-dir scripts`: the router
built from $SPILLOVER_CONFIG, for running several worker processes (spillover serve has
no --workers option)."""

from __future__ import annotations

import os

from fastapi import FastAPI

from router.app import Settings, create_app


def app() -> FastAPI:
    return create_app(Settings(config_path=os.environ["SPILLOVER_CONFIG"]))
