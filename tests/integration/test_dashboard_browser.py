"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against the
router served by uvicorn on loopback, upstreams faked: where the admin key is kept, and that
no other page can frame the dashboard. The traffic it draws is tests/e2e's."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

from router.app import Settings, create_app
from router.routing.auth import key_digest
from tests.unit.helpers import World, config

ADMIN_KEY = "sk-browser-admin-key"
KEY_STORE = "spillover.adminKey"
WAIT_MS = 10_000
APP_KEY = "sk-browser-app"
WORLD = World()  # the router's fake upstreams, shared by the module's tests


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    cfg = config(callers={"app": {"key_sha256": [key_digest(APP_KEY)]}},
                 admin_key_sha256=[key_digest(ADMIN_KEY)])
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=cfg,
                     transport=WORLD.transport())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on",
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the router did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the dashboard browser test drives Debian's chromium and none is on "
                    "PATH: install it with `apt-get install chromium`")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"],
                               timeout=30_000)
        try:
            yield b
        finally:
            b.close()


def connect(page: Page, url: str) -> None:
    page.goto(url + "/dashboard")
    expect(page.get_by_test_id("key-form")).to_be_visible()
    page.get_by_test_id("key-input").fill(ADMIN_KEY)
    page.get_by_test_id("key-submit").click()
    expect(page.locator('#app[data-state="live"]')).to_be_attached()


def test_the_admin_key_lives_in_the_tab_only(browser: Browser, router_url: str) -> None:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        connect(page, router_url)
        assert page.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") == ADMIN_KEY
        assert page.evaluate("localStorage.length") == 0
        # A reload of the tab keeps it...
        page.reload()
        expect(page.locator('#app[data-state="live"]')).to_be_attached()
        expect(page.get_by_test_id("key-form")).to_be_hidden()
        # ...another tab of the same browser does not get it.
        other = context.new_page()
        other.goto(router_url + "/dashboard")
        expect(other.get_by_test_id("key-form")).to_be_visible()
        assert other.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") is None
        # Forgetting it removes it from the tab.
        page.get_by_test_id("forget-key").click()
        expect(page.get_by_test_id("key-form")).to_be_visible()
        assert page.evaluate(f"sessionStorage.getItem('{KEY_STORE}')") is None
    finally:
        context.close()


def test_a_key_an_earlier_version_left_in_local_storage_is_removed(
        browser: Browser, router_url: str) -> None:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        page.goto(router_url + "/dashboard")
        page.evaluate(f"localStorage.setItem('{KEY_STORE}', '{ADMIN_KEY}')")
        page.reload()
        # Not used, and gone.
        expect(page.get_by_test_id("key-form")).to_be_visible()
        assert page.evaluate("localStorage.length") == 0
    finally:
        context.close()


def test_no_other_page_can_frame_the_dashboard(browser: Browser, router_url: str) -> None:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        # The framing page is another origin (localhost is not 127.0.0.1).
        framer = router_url.replace("127.0.0.1", "localhost") + "/healthz"
        page.goto(framer)
        page.set_content(f'<iframe id="f" src="{router_url}/dashboard"></iframe>')
        page.wait_for_load_state("load")
        frame = page.frame_locator("#f")
        # Blocked: the frame never shows the page (its key form, its app).
        page.wait_for_timeout(500)
        assert frame.locator("#app").count() == 0
        assert frame.locator("#key-form").count() == 0
        # The same page on its own loads.
        own = context.new_page()
        own.goto(router_url + "/dashboard")
        expect(own.get_by_test_id("key-form")).to_be_visible()
    finally:
        context.close()


def test_the_by_api_panel_shows_each_inbound_api(browser: Browser, router_url: str) -> None:
    """Requests by chat completions, Messages and Responses (one of them refused by the
    engine) show in the By API panel: requests, errors, tokens and cost per API."""
    import httpx

    auth = {"authorization": f"Bearer {APP_KEY}"}
    with httpx.Client(base_url=router_url, timeout=10) as c:
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        assert c.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        msg = {"model": "demo", "max_tokens": 16,
               "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/messages", json=msg, headers={"x-api-key": APP_KEY}
                      ).status_code == 200
        WORLD.local = lambda req: httpx.Response(400, json={
            "object": "error", "message": "bad", "type": "BadRequestError", "code": 400})
        try:
            r = c.post("/v1/responses", json={"model": "demo", "input": "hi"}, headers=auth)
        finally:
            WORLD.local = None
        assert r.status_code == 400
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        connect(page, router_url)
        panel = page.get_by_test_id("apis")
        row = panel.locator('[data-testid="api-row"][data-api="chat"]')
        expect(row.get_by_test_id("api-requests")).to_have_text("2")
        expect(row.get_by_test_id("api-errors")).to_have_text("0 · 0%")
        # The fake engine's answer: 10 prompt and 5 completion tokens each.
        expect(row.get_by_test_id("api-tokens")).to_have_text("20 / 10")
        messages = panel.locator('[data-testid="api-row"][data-api="messages"]')
        expect(messages.get_by_test_id("api-requests")).to_have_text("1")
        expect(messages.get_by_test_id("api-tokens")).to_have_text("10 / 5")
        responses = panel.locator('[data-testid="api-row"][data-api="responses"]')
        expect(responses.get_by_test_id("api-errors")).to_have_text("1 · 100%")
        # Chat first, then Messages, then Responses.
        assert panel.locator('[data-testid="api-row"]').evaluate_all(
            "rows => rows.map(r => r.dataset.api)")[:3] == ["chat", "messages", "responses"]
    finally:
        context.close()
