"""What the benchmarks share: free ports, databases beside a server's, a sandbox process coming up, and timing an
engine process alone."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from engine.database import open_database
from engine.store import Store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@asynccontextmanager
async def database_server() -> AsyncIterator[str]:
    """The PostgreSQL server the benchmark's databases go on: BENCH_DATABASE_URL's, or else the embedded one under
    .data/bench, started here and stopped after. Yields a dsn of it to make databases beside."""
    server_dsn = os.environ.get("BENCH_DATABASE_URL")
    if server_dsn:
        yield server_dsn
        return
    database = await open_database(None, str(ROOT / ".data" / "bench"))
    try:
        yield database.server.get_uri("postgres")
    finally:
        await database.close()


async def fresh_database(server_dsn: str, name: str, *seed: tuple[Any, ...]) -> str:
    """Database `name` beside `server_dsn`'s (one of that name dropped first), with the schema applied and then
    each `seed` statement run, a tuple of SQL and its arguments. Returns its dsn."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(server_dsn, name)
    store = await Store.connect(dsn, "bench", min_size=1, max_size=2)
    try:
        await store.migrate()
        for statement, *args in seed:
            await store.pool.execute(statement, *args)
    finally:
        await store.close()
    return dsn


async def fetch_values(dsn: str, *queries: str) -> list[Any]:
    """The first value of each query, over one connection."""
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(query) for query in queries]
    finally:
        await conn.close()


def engine_env(dsn: str, dr_url: str, key: str, **settings: str) -> dict[str, str]:
    """The environment of an engine process on `dsn` charging through the sandbox at `dr_url` with `key`: this
    process's own, less any DR_* and DATABASE_URL, warnings only, and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DR_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": dsn, "DR_API_URL": dr_url, "DR_API_KEY": key, "LOG_LEVEL": "warning", **settings})
    return env


async def wait_for_sandbox(http: aiohttp.ClientSession, url: str) -> None:
    """Until the sandbox process at `url` answers (10 seconds at most)."""
    for _ in range(100):
        try:
            async with http.get(f"{url}/_sandbox/config") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the sandbox process at {url} did not start")


def run_engine(args: list[str], env: dict[str, str], profile: str | None = None) -> tuple[float, float, float]:
    """Run `run.py ARGS` to the end: (wall seconds, CPU seconds, peak RSS MB) of that process alone.

    With `profile`, py-spy (`pip install py-spy`) samples the engine into that file (speedscope JSON); the
    figures are then py-spy's process and its child together."""
    started = time.monotonic()
    command = [sys.executable, str(ROOT / "run.py"), *args]
    if profile:
        py_spy = str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "--format", "speedscope", "--rate", "200", "-o", profile, "--", *command]
    proc = subprocess.Popen(command, env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"engine {args} exited {proc.returncode}: {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
