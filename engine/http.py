"""The engine's HTTP surface: `/healthz`, `/readyz`, `/metrics` and the operator console (`/`, engine/console), on
HTTP_HOST:HTTP_PORT (loopback by default).

    GET /healthz   200 {"status": "ok"} while the process serves requests (liveness)
    GET /readyz    200 {"status": "ready", "checks": {…}} when the database answers, every actor runs and
                   Digital River accepts a key (a storefront whose key it refused is named in the check's
                   `refused`; the process still serves the others, so it stays ready); otherwise 503
                   {"status": "not_ready", "failing": [names], "checks": {…}}
    GET /metrics   the Prometheus text format, after reading the database gauges (time-boxed)

These three only read: nothing here changes the engine or the database; the console's actions (retry, pause,
resume) need ADMIN_TOKEN and go through engine/controls.py. The server binds where it is told, and the settings
default to 127.0.0.1, so the endpoints are never public unless HTTP_HOST says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.logs import error_text, get_logger
from engine.metrics import DB_ERRORS, Metrics
from engine.store import Store

if TYPE_CHECKING:
    from engine.console import Console

log = get_logger(component="http")
DB_TIMEOUT_SECONDS = 2.0


class Health:
    """The liveness and readiness checks, from what the engine hands over.

    `store`: the process's store (`SELECT 1` must answer within `db_timeout` seconds; /metrics reads its gauges
    through it too). `actors_running()` → {actor: running}; ready when every actor runs (an empty answer, before
    the supervisor starts, is not ready). `dr_key_ok()` → False once Digital River refused the key (401/403);
    `refused_storefronts()`, when given, names the storefronts whose key it refused (issue 17).
    """

    def __init__(self, store: Store, actors_running: Callable[[], dict[str, bool]], dr_key_ok: Callable[[], bool],
                 *, db_timeout: float = DB_TIMEOUT_SECONDS,
                 refused_storefronts: Callable[[], list[str]] | None = None) -> None:
        self.store = store
        self.actors_running = actors_running
        self.dr_key_ok = dr_key_ok
        self.refused_storefronts = refused_storefronts
        self.db_timeout = db_timeout

    def _key(self) -> dict[str, Any]:
        check: dict[str, Any] = {"ok": bool(self.dr_key_ok())}
        if self.refused_storefronts is not None:
            check["refused"] = self.refused_storefronts()
        return check

    def alive(self) -> bool:
        """The process is alive. Being asked at all proves the event loop turns: a blocked loop cannot answer,
        and the probe's own timeout reports it."""
        return True

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """(ready, {check: {"ok": bool, …details}}) for the database, the actors and the Digital River key."""
        checks = {
            "database": await self._database(),
            "actors": _call_check(self._actors),
            "digital_river_key": _call_check(self._key),
        }
        return all(check["ok"] for check in checks.values()), checks

    async def _database(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.store.fetchval("health_ping"), self.db_timeout)
        except DB_ERRORS as exc:
            error = (f"no answer within {self.db_timeout:g} s" if isinstance(exc, TimeoutError)
                     else error_text(exc))
            return {"ok": False, "error": error}
        return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}

    def _actors(self) -> dict[str, Any]:
        running = {name: bool(up) for name, up in self.actors_running().items()}
        down = sorted(name for name, up in running.items() if not up)
        check: dict[str, Any] = {"ok": bool(running) and not down, "running": running}
        if down:
            check["down"] = down
        elif not running:
            check["error"] = "no actors are running yet"
        return check


def _call_check(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return check()
    except Exception as exc:  # the engine's callable: a failing check is a not-ready answer, not a 500
        return {"ok": False, "error": error_text(exc)}


async def serve_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Bind `app` on `host`:`port` and serve it; raises OSError when the address is taken. No access log: a
    scrape every few seconds (or a stream of webhooks) would drown the engine's own lines."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class HttpServer:
    """/healthz, /readyz and /metrics on `host`:`port` (port 0: any free port; `port` tells which after start), and
    the operator console's pages when given one."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Health, console: Console | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.health = health
        self.console = console
        self._runner: web.AppRunner | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every (host, port) a listening socket is bound to (a host name may resolve to several)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP server is not started")
        return [(str(bound[0]), int(bound[1])) for bound in self._runner.addresses]

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) of the first listening socket."""
        return self.addresses[0]

    @property
    def port(self) -> int:
        return self.address[1]

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken or not local."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self.console is not None:
            self.console.add_routes(app)
        self._runner = await serve_app(app, self.host, self.requested_port)
        if self.console is not None:
            await self.console.start()
        host, port = self.address
        log.info("http_started", host=host, port=port)

    async def stop(self) -> None:
        """Stop serving (idempotent); requests in progress get a few seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            if self.console is not None:
                await self.console.stop()
            await runner.cleanup()
            log.info("http_stopped")

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health.alive():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "failing"}, status=503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = await self.health.ready()
        if ready:
            return web.json_response({"status": "ready", "checks": checks})
        failing = sorted(name for name, check in checks.items() if not check["ok"])
        return web.json_response({"status": "not_ready", "failing": failing, "checks": checks}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.metrics.refresh_from_store(self.health.store)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})
