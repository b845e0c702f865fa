"""GET /dashboard: one self-contained page (no CDN); its assets are served from here and
it refreshes from GET /status."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

from router.errors import NotFound

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def dashboard_routes() -> APIRouter:
    r = APIRouter(include_in_schema=False)
    assets = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}

    @r.get("/dashboard")
    async def page() -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type=_TYPES[".html"],
                            headers={"cache-control": "no-cache"})

    @r.get("/dashboard/assets/{name}")
    async def asset(name: str) -> Response:
        # Only files that exist at start, by exact name: no path ever reaches the disk.
        path = assets.get(name)
        if path is None:
            raise NotFound(f"no dashboard asset {name!r}")
        return FileResponse(path, media_type=_TYPES[path.suffix],
                            headers={"cache-control": "no-cache"})

    return r
