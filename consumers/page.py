"""The status page: static HTML, CSS and vanilla JS from `consumers/static/`.

The page reads the JSON API and renders it in the browser, so the server
only hands out files. No build step, no CDN: it works on an air-gapped cluster.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
# Only these files are served: nothing else in the package is reachable.
FILES = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
# Scripts and styles from this origin only: an event payload shown on the
# page can never run code in an operator's browser.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _file(name: str, content_type: str) -> web.Response:
    return web.Response(
        body=(STATIC / name).read_bytes(),
        content_type=content_type,
        charset="utf-8" if content_type.startswith("text/") else None,
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


async def index(_request: web.Request) -> web.Response:
    """The page (`/` and `/rollbacks/{id}`; the script reads the path)."""
    return _file("index.html", "text/html")


async def static(request: web.Request) -> web.Response:
    """One of the page's assets."""
    name = request.match_info["name"]
    content_type = FILES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return _file(name, content_type)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the page and its assets."""
    router.add_get("/", index)
    router.add_get("/rollbacks/{rollback_id}", index)
    router.add_get("/static/{name}", static)
