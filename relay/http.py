"""The relay's HTTP server: one aiohttp application on the relay's own event loop.

Parts of the relay register their routes on it — plugins through :attr:`relay.plugin.PluginHost.http`
(tracking links), later ``/metrics``, ``/readyz`` and the admin API — and the relay starts it once the
chain has started. It serves ``GET /healthz`` itself (liveness: 200 "ok" while the process serves; it
checks no dependency, readiness is another route's business).

Invariants:
- It exists only when ``[http].address`` is set (:func:`build_http_server` returns None otherwise) and
  binds exactly that address, nowhere else.
- Routes are added before :meth:`HttpServer.start`; adding one afterwards raises ``RuntimeError``
  (aiohttp freezes its router when the application starts, and a route that appears later would be
  a route nobody tested at start-up).
- No access log: request paths carry tracking tokens and, later, admin parameters. A handler that raises
  becomes a bare 500 with the detail in our log only, named by the route's pattern, never its path.
- Paths use aiohttp's syntax for variable parts (``/t/c/{token}``); a GET route also answers HEAD.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.log import get_logger
from relay.settings import HttpSettings

log = get_logger(__name__)

__all__ = ["Handler", "HttpServer", "build_http_server"]

# What relay.plugin.HttpRoutes accepts: an aiohttp request in, an aiohttp response out.
Handler = Callable[[Any], Awaitable[Any]]
SERVER_HEADER = "relay"


class HttpServer:
    """The HTTP server; implements :class:`relay.plugin.HttpRoutes`."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.app = web.Application(client_max_size=settings.max_request_size,
                                   middlewares=[_contain_handler_errors])
        self.app.on_response_prepare.append(_set_server_header)
        self._runner: web.AppRunner | None = None
        self._routes: list[tuple[str, str]] = []
        self.add_route("GET", "/healthz", _healthz)

    # -- routes ---------------------------------------------------------------------------------------
    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path`` with ``handler`` (an aiohttp handler); before :meth:`start` only."""
        if self._runner is not None:
            raise RuntimeError(f"HTTP route {method} {path} added after the HTTP server started")
        method = method.upper()
        if method == "GET":
            self.app.router.add_get(path, handler, allow_head=True)
        else:
            self.app.router.add_route(method, path, handler)
        self._routes.append((method, path))

    @property
    def routes(self) -> list[tuple[str, str]]:
        """(method, path pattern) in the order they were added."""
        return list(self._routes)

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind ``[http].address`` and serve; ``OSError`` when the address cannot be bound."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.settings.shutdown_grace)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("http_listening", address=self.settings.address, port=self.port, routes=len(self._routes))

    async def stop(self) -> None:
        """Stop accepting, give open requests the grace period, close."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()
        log.info("http_stopped")

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before start."""
        if self._runner is None:
            return 0
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return 0


def build_http_server(settings: HttpSettings) -> HttpServer | None:
    """The HTTP server for ``[http]``, or None when no address is configured."""
    return HttpServer(settings) if settings.address else None


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


@web.middleware
async def _contain_handler_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:  # any handler failure is one generic 500; the detail stays in our log
        resource = request.match_info.route.resource
        log.exception("http_handler_failed", method=request.method,
                      route=resource.canonical if resource is not None else "?", error=repr(exc))
        return web.Response(status=500, text="internal error")


async def _set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp announces its own version by default; the relay says only who it is.
    response.headers["Server"] = SERVER_HEADER
