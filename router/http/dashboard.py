"""GET /dashboard: one self-contained page (no CDN); its assets are served from here and
it refreshes from GET /status."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

from router.errors import NotFound

STATIC = Path(__file__).parent / "static"
# Sent as headers (the page's meta tag cannot say frame-ancestors): the page loads and
# fetches from the gateway only, runs no inline script, and no other site may frame it
# (clickjacking a page that holds the admin key).
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"cache-control": "no-cache", "content-security-policy": _CSP,
           "x-frame-options": "DENY", "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def dashboard_routes() -> APIRouter:
    r = APIRouter(include_in_schema=False)
    assets = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}

    @r.get("/dashboard")
    async def page() -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type=_TYPES[".html"],
                            headers=HEADERS)

    @r.get("/dashboard/assets/{name}")
    async def asset(name: str) -> Response:
        # Only files that exist at start, by exact name: no path ever reaches the disk.
        path = assets.get(name)
        if path is None:
            raise NotFound(f"no dashboard asset {name!r}")
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=HEADERS)

    return r
