"""HTTP endpoints for operators: /metrics (Prometheus), /healthz and /readyz."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from forwarder.daemon import Daemon


def build_app(daemon: Daemon) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(daemon.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Alive: the event loop serves this request and no supervised task has failed.
        if daemon.failed:
            return web.json_response({"status": "failed"}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = []
        if not daemon.ready:
            problems.append("not running")
        if daemon.dead_full:
            problems.append("dead-letter store full")
        status = 503 if problems else 200
        return web.json_response({"ready": not problems, "problems": problems}, status=status)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_metrics_server(daemon: Daemon, listen: str) -> tuple[Any, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    runner = web.AppRunner(build_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    server = site._server
    bound_port = int(port)
    if server is not None and server.sockets:
        bound_port = server.sockets[0].getsockname()[1]
    return runner, bound_port
