"""Running `python run.py …` as a real subprocess in tests, the environments it runs in, reading its JSON log
lines and asking its HTTP endpoints; and the local Digital River (the sandbox) for a test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.settings import JOBS, env_prefix
from sandbox.config import SandboxConfig
from sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "sk_test_drjobs_Secret_Tests_0123456789"


def engine_env(database_url: str | None, **overrides: str) -> dict[str, str]:
    """Environment for an engine subprocess: every schedule off unless overridden, JSON logs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DR_", "DATABASE_URL", "APP_LOG", "LOG_", "NODE_NAME"))
           and not k.endswith(("_SCHEDULE", "_CONCURRENCY"))}
    env.update({
        "DR_API_KEY": TEST_KEY,
        # Nothing listens on the discard port: a job that called Digital River here would fail loudly.
        "DR_API_URL": "http://127.0.0.1:9",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        # Several engines run at once in tests: each takes a free port for /healthz, /readyz, /metrics.
        "HTTP_PORT": "0",
        # and for Digital River's webhooks.
        "WEBHOOK_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    })
    for job in JOBS:
        env[f"{env_prefix(job)}_SCHEDULE"] = "off"
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(overrides)
    return env


def sandbox_env(database_url: str | None, sandbox: Sandbox, **overrides: str) -> dict[str, str]:
    """`engine_env` for a process that charges through `sandbox`: 5-second leases (a killed process's records
    come back soon) and 500 requests a second to Digital River; `overrides` win."""
    return engine_env(database_url, **({"DR_API_URL": sandbox.url, "LEASE_SECONDS": "5",
                                        "DR_MAX_REQUESTS_PER_SECOND": "500"} | overrides))


def serving_env(database_url: str | None, sandbox: Sandbox, **overrides: str) -> dict[str, str]:
    """`sandbox_env` for a `serve` that charges a backlog by itself: both installment jobs scheduled every
    second, 4 payments in flight, 1,000 requests a second; `overrides` win."""
    return sandbox_env(database_url, sandbox, **({
        "SUBSCRIPTION_INSTALLMENTS_SCHEDULE": "every 1s", "RECURRING_PAYMENTS_SCHEDULE": "every 1s",
        "RECURRING_PAYMENTS_CONCURRENCY": "4", "DR_MAX_REQUESTS_PER_SECOND": "1000"} | overrides))


def sandbox_fixture(**config: Any) -> Any:
    """A `sandbox` fixture for a test module, `sandbox = sandbox_fixture(seed=…)`: a local Digital River with
    this SandboxConfig, new for each test."""
    @pytest.fixture
    async def sandbox() -> AsyncIterator[Sandbox]:
        async with Sandbox(SandboxConfig(**config)) as sb:
            yield sb
    return sandbox


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    """An engine's GET /readyz on `port`: (status, body)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


async def healthz(port: int) -> int:
    """An engine's GET /healthz on `port`: its status."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status


class EngineProcess:
    """One `python run.py ARGS` subprocess whose stdout JSON lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self.stderr = ""
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> EngineProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "run.py"), *self.args, env=self.env, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(), name="engine-stdout")
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            async for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.other_lines.append(line)
                self._changed.set()
        finally:
            self._changed.set()  # the end of the output wakes a waiter too: the engine may have exited

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 30.0, **fields: Any) -> list[dict[str, Any]]:
        """Wait until `count` events named `event` (with these fields) were logged."""
        async def until() -> list[dict[str, Any]]:
            while len(found := self.find(event, **fields)) < count:
                if self.proc and self._reader and self._reader.done():
                    # The output ended: the engine exited (or is exiting) without logging it. Say so at once.
                    code = await self.proc.wait()
                    if not self.stderr and self.proc.stderr is not None:
                        self.stderr = (await self.proc.stderr.read()).decode(errors="replace")
                    raise AssertionError(f"engine exited ({code}) before {event}: {self.stderr}")
                self._changed.clear()
                await self._changed.wait()
            return found
        return await asyncio.wait_for(until(), timeout)

    def signal(self, sig: int) -> None:
        assert self.proc
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 60.0) -> int:
        assert self.proc and self.proc.stderr
        stderr = await asyncio.wait_for(self.proc.stderr.read(), timeout)
        self.stderr = stderr.decode(errors="replace")
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await self._reader
        return code

    async def __aenter__(self) -> EngineProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc and self.proc.returncode is None:
            self.kill()
            await self.wait()


async def run_command(args: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[int, str, str]:
    """Run `python run.py ARGS` to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), *args, env=env, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
