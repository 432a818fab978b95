"""The worker's HTTP server (aiohttp), started with the runtime on `BACKOUT_WEB_PORT`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from mode import Service

from consumers.api import build_web_app
from consumers.settings import Settings

if TYPE_CHECKING:
    from consumers.runtime import Runtime

log = logging.getLogger(__name__)


class WebServer(Service):
    """Serves the API, the status page and `/metrics`."""

    def __init__(self, settings: Settings, runtime: Runtime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.runtime = runtime
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def on_start(self) -> None:
        """Bind and serve."""
        app = build_web_app(self.settings, self.runtime)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.web_host, self.settings.web_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            # Two workers on one machine collide here: name the settings that separate them.
            raise OSError(
                exc.errno,
                f"cannot serve the HTTP API on {self.settings.web_host}:{self.settings.web_port} "
                f"(BACKOUT_WEB_HOST, BACKOUT_WEB_PORT): {exc.strerror}",
            ) from exc
        # aiohttp keeps the bound sockets private; port 0 needs the real port.
        sockets = list(site._server.sockets if site._server else [])
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.web_port
        log.info("HTTP API on http://%s:%s", self.settings.web_host, self.port)

    async def on_stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
