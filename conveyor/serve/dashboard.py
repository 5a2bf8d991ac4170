"""The live web dashboard: a JSON API over the workspace database and one self-contained page (loss curves,
queue, current job with ETA, ledger, controls, a box to ask the model), updated through server-sent events.

Run it with `conveyor dashboard [--host 127.0.0.1] [--port 8750] [--token T]`, or from Python with
`conveyor.serve.dashboard.serve(workspace_folder)`; then open http://127.0.0.1:8750/ (add `?token=T` when a token
is set).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..errors import ConveyorError
from ..store.workspace import Workspace
from .api import ASK_TIMEOUT, Settings, router

if TYPE_CHECKING:
    import uvicorn

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# The page's scripts and styles are inline and it talks only to this server: nothing loads from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Cache-Control": "no-store",
}


def page_html() -> str:
    return resources.files("conveyor").joinpath("assets/dashboard.html").read_text(encoding="utf-8")


def _host_of(value: str) -> str:
    """The host name in a Host header, without port or IPv6 brackets."""
    netloc = urlsplit(value if "//" in value else "//" + value).hostname
    return (netloc or "").lower()


def is_loopback(host: str) -> bool:
    return host.strip("[]").lower() in LOOPBACK_HOSTS


class HostGuard:
    """Refuses requests addressed to another host name when serving without a token (a web page on another
    site could otherwise reach 127.0.0.1 through DNS rebinding), and cross-site POSTs (a form on another site
    could otherwise press Stop)."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_of(headers.get("host", ""))
        problem = None
        if self.loopback_only and not is_loopback(host):
            problem = (f"host {host!r} refused: without a token the dashboard answers only on 127.0.0.1 or "
                       "localhost; start it with --token to serve other hosts")
        elif scope["method"] == "POST" and headers.get("origin") and \
                urlsplit(headers["origin"]).netloc.lower() != headers.get("host", "").lower():
            problem = f"cross-site request from {headers['origin']} refused"
        if problem:
            return await JSONResponse({"detail": problem}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def authorizer(token: str | None) -> Callable[[Request], None]:
    """The check every /api/* request passes: with a token, `Authorization: Bearer <token>` (the event stream may
    pass `?token=` instead: EventSource cannot set headers); without one, nothing (HostGuard keeps to loopback)."""
    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" and request.url.path == "/api/stream":
            given = request.query_params.get("token", "")
        elif scheme.lower() != "bearer":
            given = ""
        if not given:
            raise HTTPException(401, "this dashboard needs a token: send `Authorization: Bearer <token>` "
                                     "(the page: open it as /?token=<token>)")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "wrong token: use the one the dashboard was started with (--token)")

    return authorize


def create_app(ws_root: Path, token: str | None = None, control_timeout: float = 10.0,
               stream_interval: float = 1.0, heartbeat_seconds: float = 15.0,
               ask_timeout: float = ASK_TIMEOUT) -> FastAPI:
    """The dashboard app for one workspace: the page and the routes of api.py. With a token, every /api/* request
    must carry it (`authorizer`); without one, only requests addressed to a loopback host name are answered (no
    DNS rebinding).

    A run's series and tables (`?run=`, default: the active run) follow its lineage: a rollback's run shows the
    steps it inherited from the run it branched from (rows marked `"inherited": true`, with that `run`), then its
    own; each answer's `lineage` lists the spans (status.lineage_steps)."""
    app = FastAPI(title="conveyor dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = Settings(Workspace.open(ws_root).root, control_timeout, stream_interval, heartbeat_seconds,
                                  ask_timeout)
    app.state.closing = lambda: False  # build_server makes this the server's exit flag
    app.add_middleware(HostGuard, loopback_only=token is None)
    app.add_api_route("/", page, response_class=HTMLResponse, include_in_schema=False)
    app.include_router(router, dependencies=[Depends(authorizer(token))])
    return app


def page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers=PAGE_HEADERS)


def check_bind(host: str, token: str | None, port: int | None = None) -> None:
    """Refuse to serve beyond this machine without a token, or on a port something else holds."""
    if token is None and not is_loopback(host):
        raise ConveyorError(f"refusing to serve the dashboard on {host} without a token: anyone who can reach it "
                            "could stop training. Pass --token <secret>, or bind --host 127.0.0.1")
    if port is None:
        return
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConveyorError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e} (another dashboard "
                                "or program holds it?); pick another with --port") from None


def build_server(ws_root: Path, host: str = "127.0.0.1", port: int = 8750, token: str | None = None,
                 **options) -> "uvicorn.Server":
    """A uvicorn server for the dashboard (not started); `options` go to create_app."""
    import uvicorn

    check_bind(host, token)
    app = create_app(ws_root, token=token, **options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    # Event streams never end on their own: they end when the server starts to exit, so that Ctrl+C does
    # not wait for every open browser tab.
    app.state.closing = lambda: server.should_exit
    return server


def serve(ws_root: Path, host: str = "127.0.0.1", port: int = 8750, token: str | None = None) -> None:
    """Serve the dashboard until interrupted."""
    build_server(ws_root, host, port, token).run()
