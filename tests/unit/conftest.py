"""Unit tests: no process, no socket server, no database. A test that needs one goes to
tests/integration, where the PostgreSQL fixtures live. Shared builders and checks are in
tests/unit/helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.unit.helpers import World, gateway_app, lifespan_client


@pytest.fixture
def world() -> World:
    """The engine and La Plateforme, faked; a test flips their behaviour."""
    return World()


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    """The router on `world` with the BASE_YAML config, called in-process."""
    async with lifespan_client(gateway_app(world)) as c:
        yield c
