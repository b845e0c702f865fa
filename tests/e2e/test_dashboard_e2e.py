"""The dashboard end to end: real traffic through a router (vLLM CPU engine, fake La
Plateforme), then Debian's chromium, driven by Playwright, reads GET /dashboard as an
operator would and must show exactly that traffic."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    ConsoleMessage,
    Error,
    Page,
    Request,
    ViewportSize,
    expect,
    sync_playwright,
)

from router.routing.auth import key_digest
from tests.e2e.conftest import ROOT, Hosted, Router
from tests.e2e.test_gateway_e2e import HELLO

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-e2e-dash-admin"
APP_KEY = "sk-e2e-dash-app"
DAILY_BUDGET_USD = 1.0
# The README's screenshot, rewritten only when asked (SPILLOVER_PUBLISH_DOCS=1): a test
# run must leave the tree as it found it.
SCREENSHOT = ROOT / "docs" / "dashboard.png"
PUBLISH = os.environ.get("SPILLOVER_PUBLISH_DOCS") == "1"
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
WAIT_MS = 10_000  # every wait in the browser; the page refreshes every second


@dataclass
class PageLog:
    """What the page did besides drawing: console errors and requests off the router."""

    origin: str
    errors: list[tuple[str, str]] = field(default_factory=list)  # (text, url)
    foreign: list[str] = field(default_factory=list)

    def on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append((msg.text, msg.location.get("url", "")))

    def on_page_error(self, exc: Error) -> None:
        self.errors.append((f"uncaught: {exc}", ""))

    def on_request(self, request: Request) -> None:
        url = urlsplit(request.url)
        if url.scheme in ("data", "blob"):
            return
        if f"{url.scheme}://{url.netloc}" != self.origin:
            self.foreign.append(request.url)

    def unexpected_errors(self, allowed: str, status_url: str) -> list[tuple[str, str]]:
        """Console errors other than Chromium's own line for a /status answer the test
        provoked on purpose (it logs every failed fetch, handled or not)."""
        return [(text, url) for text, url in self.errors
                if not (url == status_url and text.startswith("Failed to load resource")
                        and allowed in text)]


@contextmanager
def dashboard_page(router: Router) -> Iterator[tuple[Page, PageLog]]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the dashboard test drives Debian's chromium and none is on PATH: "
                    "install it with `apt-get install chromium` (never `playwright install`)")
    log = PageLog(origin=router.url)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"],
                                     timeout=30_000)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            page.on("console", log.on_console)
            page.on("pageerror", log.on_page_error)
            page.on("request", log.on_request)
            yield page, log
        finally:
            browser.close()


def send(router: Router, request_id: str, hosted: bool = False) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    if hosted:
        headers["x-spillover-route"] = "hosted"
    raw = router.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8, extra_headers=headers)
    assert raw.parse().choices[0].message.content is not None
    return dict(raw.headers)


def row(page: Page, request_id: str) -> Any:
    return page.locator(f'[data-testid="decision-row"][data-request-id="{request_id}"]')


def bar_total(page: Page, route: str) -> int:
    counts = page.locator(f'[data-testid="split-bar"][data-route="{route}"]').evaluate_all(
        "bars => bars.map(b => Number(b.dataset.count))")
    return sum(counts)


def test_dashboard_shows_the_traffic(make_router: Any, plateforme: Hosted,
                                     tmp_path: Path) -> None:
    router: Router = make_router(api_key=APP_KEY, extra={
        "callers": {"app": {"key_sha256": [key_digest(APP_KEY)]}},
        "admin_key_sha256": [key_digest(ADMIN_KEY)],
        "budget": {"daily_usd": DAILY_BUDGET_USD},
    })
    local_ids = [f"dash-local-{i}" for i in range(3)]
    hosted_ids = [f"dash-hosted-{i}" for i in range(2)]
    for rid in local_ids:
        assert send(router, rid)["x-spillover-reason"] == "local-ok"
    for rid in hosted_ids:
        assert send(router, rid, hosted=True)["x-spillover-reason"] == "forced"
    assert len(plateforme.fake.requests_to("/v1/chat/completions")) == len(hosted_ids)

    with dashboard_page(router) as (page, log):
        page.goto(router.url + "/dashboard")
        # Callers are configured: /status answers 401 without a key and the page asks.
        form = page.get_by_test_id("key-form")
        expect(form).to_be_visible()
        page.get_by_test_id("key-input").fill("sk-not-the-admin")
        page.get_by_test_id("key-submit").click()
        expect(page.get_by_test_id("key-message")).to_contain_text("refused")
        assert page.evaluate("sessionStorage.getItem('spillover.adminKey')") is None
        page.get_by_test_id("key-input").fill(ADMIN_KEY)
        page.get_by_test_id("key-submit").click()

        # Set only once a GET /status was answered and drawn.
        expect(page.locator('#app[data-state="live"]')).to_be_attached()
        expect(form).to_be_hidden()
        # For this tab only: never in localStorage, where it would outlive the session.
        assert page.evaluate("sessionStorage.getItem('spillover.adminKey')") == ADMIN_KEY
        assert page.evaluate("localStorage.length") == 0
        expect(page.get_by_test_id("fetch-error")).to_be_hidden()
        expect(page.get_by_test_id("last-update")).to_contain_text("last update")
        expect(page.get_by_test_id("ready-state")).to_have_text("ready")
        expect(page.get_by_test_id("open-warning")).to_be_hidden()

        card = page.locator('[data-testid="engine-card"][data-engine="demo-local"]')
        expect(card).to_have_attribute("data-healthy", "true")
        expect(card.get_by_test_id("engine-health")).to_have_text("healthy")
        expect(card.get_by_test_id("engine-score-bar")).to_be_visible()
        expect(card.get_by_test_id("engine-kv")).to_have_text(re.compile(r"^\d+%$"))

        expect(page.get_by_test_id("today-local")).to_have_text("3")
        expect(page.get_by_test_id("today-hosted")).to_have_text("2")
        expect(page.get_by_test_id("today-requests")).to_have_text("5")
        expect(page.get_by_test_id("today-errors")).to_have_text("0")
        expect(page.get_by_test_id("today-share")).to_have_text("60%")
        expect(page.get_by_test_id("split-share")).to_have_text("60%")
        expect(page.get_by_test_id("today-hosted-cost")).not_to_have_text("$0")

        for rid in local_ids:
            expect(row(page, rid)).to_have_attribute("data-reason", "local-ok")
            expect(row(page, rid)).to_have_attribute("data-route", "local")
            expect(row(page, rid).get_by_test_id("decision-reason")).to_have_text("local-ok")
        for rid in hosted_ids:
            expect(row(page, rid)).to_have_attribute("data-reason", "forced")
            expect(row(page, rid)).to_have_attribute("data-route", "hosted")
            expect(row(page, rid)).to_contain_text("mistral")
        # Newest first.
        ids = page.get_by_test_id("decision-row").evaluate_all(
            "rows => rows.map(r => r.dataset.requestId)")
        assert ids == [*reversed(hosted_ids), *reversed(local_ids)]

        # The split chart drew the same traffic as bars.
        assert bar_total(page, "local") == 3
        assert bar_total(page, "hosted") == 2
        assert bar_total(page, "errors") == 0

        expect(page.get_by_test_id("budget-daily-state")).to_contain_text("of $1.00")
        expect(page.get_by_test_id("budget-daily-bar")).to_be_visible()
        expect(page.get_by_test_id("budget-monthly-state")).to_have_text("no budget")
        breaker = page.locator('[data-testid="breaker-row"]'
                               '[data-upstream="mistral:mistral-small-latest"]')
        expect(breaker).to_have_attribute("data-state", "closed")

        # It keeps refreshing: a request sent now shows up without a reload.
        send(router, "dash-live")
        expect(row(page, "dash-live")).to_have_attribute("data-reason", "local-ok")
        expect(page.get_by_test_id("today-local")).to_have_text("4")

        shot = page.screenshot(full_page=True)
        (tmp_path / "dashboard.png").write_bytes(shot)
        if PUBLISH:
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(shot)

        assert log.unexpected_errors("401", router.url + "/status") == []
        assert log.foreign == []


def test_dashboard_open_mode_and_fetch_errors(make_router: Any) -> None:
    router: Router = make_router()
    send(router, "dash-open")
    with dashboard_page(router) as (page, log):
        page.goto(router.url + "/dashboard")
        expect(page.locator('#app[data-state="live"]')).to_be_attached()
        expect(page.get_by_test_id("open-warning")).to_be_visible()
        expect(page.get_by_test_id("key-form")).to_be_hidden()
        expect(row(page, "dash-open")).to_have_attribute("data-reason", "local-ok")
        expect(page.get_by_test_id("budget-daily-state")).to_have_text("no budget")

        # The gateway stops answering: the page says so and keeps the last data, dimmed.
        page.route("**/status", lambda route: route.abort())
        error = page.get_by_test_id("fetch-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("Cannot refresh")
        expect(page.locator('#app[data-state="error"]')).to_be_attached()
        expect(page.get_by_test_id("ready-state")).to_have_text("state unknown")
        expect(row(page, "dash-open")).to_be_attached()

        page.unroute("**/status")
        expect(page.locator('#app[data-state="live"]')).to_be_attached()
        expect(error).to_be_hidden()
        expect(page.get_by_test_id("ready-state")).to_have_text("ready")

        assert log.unexpected_errors("net::ERR_FAILED", router.url + "/status") == []
        assert log.foreign == []
