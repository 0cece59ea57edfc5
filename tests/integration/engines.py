"""An in-process Engine against a Digital River stand-in (the sandbox, or a test's own server), for tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from actors import build_jobs
from engine.app import Engine
from engine.logs import install_app_log
from engine.settings import load
from engine.store import Store
from sandbox.server import Sandbox
from tests.support import TEST_KEY


@asynccontextmanager
async def engine_on(store: Store, dr: Sandbox | str, *, key: str = TEST_KEY,
                    retry_backoff: tuple[float, float] | None = None, **env: str) -> AsyncIterator[Engine]:
    """An Engine on `store` talking to `dr` (a Sandbox or a base URL). `retry_backoff` (base, max) makes the
    client's retries of transient failures quick without changing how many it makes."""
    settings = load({"DR_API_KEY": key, "DR_API_URL": dr if isinstance(dr, str) else dr.url,
                     "DR_MAX_REQUESTS_PER_SECOND": "1000", "APP_LOG_LEVEL": "WARN", "NODE_NAME": store.node,
                     **env}, command="drain", is_terminal=False)
    engine = Engine(settings, store, build_jobs)
    if retry_backoff is not None:
        assert engine.dr is not None
        engine.dr.backoff_base, engine.dr.backoff_max = retry_backoff
    try:
        yield engine
    finally:
        install_app_log(None)


async def drain(store: Store, dr: Sandbox | str, **options: Any) -> int:
    async with engine_on(store, dr, **options) as engine:
        return await engine.drain()


async def run_job(store: Store, dr: Sandbox | str, job: str, **options: Any) -> int:
    async with engine_on(store, dr, **options) as engine:
        return await engine.run_job(job)
