"""Benchmark (not a test): the Digital River client against the sandbox.

    .venv/bin/python bench/dr_client.py                  # sandbox in this process and event loop
    .venv/bin/python bench/dr_client.py --sandbox-process  # sandbox in a child process (the client alone here)
    .venv/bin/python bench/dr_client.py --seconds 10 --scenarios 0:64,200:1024

For each scenario (added sandbox latency in ms : concurrency) it runs two workloads for `--seconds` after a
one-second warm-up: `checkout` (POST /checkouts alone) and `pair` (POST /checkouts then POST /orders, the
installment payment step). It prints requests/s (and pairs/s) as a Markdown table for docs/benchmarks.md.
The rate limit is set far above what is reachable so the token bucket never binds (it still runs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, wait_for_sandbox  # noqa: E402
from engine.digital_river import DigitalRiverClient  # noqa: E402
from sandbox.server import Sandbox, SandboxConfig  # noqa: E402

KEY = "sk_test_bench"
CHECKOUT = {
    "currency": "USD",
    "customerId": "cus_bench",
    "sourceId": "src_bench",
    "chargeType": "merchant_initiated",
    "upstreamId": "up_bench",
    "shipTo": {"address": {"line1": "1 Main St", "city": "Minneapolis", "country": "US"}},
    "items": [{"skuId": "sku_bench", "price": 19.99, "quantity": 1,
               "subscriptionInfo": {"autoRenewal": True, "billingAgreementId": "ba_bench",
                                    "subscriptionId": "sub_bench"}}],
}


@dataclass
class Result:
    workload: str
    latency_ms: int
    concurrency: int
    seconds: float
    operations: int
    requests: int
    errors: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def operations_per_second(self) -> float:
        return self.operations / self.seconds


@asynccontextmanager
async def sandbox_in_process(latency_ms: int) -> AsyncIterator[tuple[str, Callable[[int], Awaitable[None]]]]:
    async with Sandbox(SandboxConfig(latency_ms=latency_ms, max_ledger_requests=0)) as sb:
        async def set_latency(ms: int) -> None:
            sb.configure(latency_ms=ms)
        yield sb.url, set_latency


@asynccontextmanager
async def sandbox_process(latency_ms: int) -> AsyncIterator[tuple[str, Callable[[int], Awaitable[None]]]]:
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox", "--port", str(port), "--latency-ms", str(latency_ms),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for_sandbox(http, url)

            async def set_latency(ms: int) -> None:
                async with http.post(f"{url}/_sandbox/config", json={"latency_ms": ms,
                                                                    "max_ledger_requests": 0}) as r:
                    r.raise_for_status()
            await set_latency(latency_ms)
            yield url, set_latency
    finally:
        child.terminate()
        await child.wait()


async def run_workload(url: str, workload: str, latency_ms: int, concurrency: int, seconds: float) -> Result:
    client = DigitalRiverClient(url, KEY, max_requests_per_second=1_000_000.0, connection_limit=concurrency,
                                timeout_seconds=60.0, max_retries=0)
    operations = requests = errors = 0
    measuring = False
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal operations, requests, errors
        while not stop.is_set():
            try:
                checkout = await client.create_checkout(CHECKOUT)
                sent = 1
                if workload == "pair":
                    await client.create_order(checkout.id)
                    sent = 2
            except Exception:
                if measuring:
                    errors += 1
                continue
            if measuring:
                operations += 1
                requests += sent

    async with client:
        workers = [asyncio.create_task(worker(), name=f"bench-worker-{i}") for i in range(concurrency)]
        await asyncio.sleep(1.0)  # warm-up: connections opened, caches filled
        measuring = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*workers)
    return Result(workload, latency_ms, concurrency, elapsed, operations, requests, errors)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--scenarios", default="0:64,200:64,200:256,200:1024",
                        help="comma-separated latency_ms:concurrency pairs")
    parser.add_argument("--sandbox-process", action="store_true", help="run the sandbox in a child process")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the table shows their median")
    args = parser.parse_args(argv)
    scenarios = [tuple(int(x) for x in s.split(":")) for s in args.scenarios.split(",")]
    # Per-request DEBUG lines would measure the console, not the client.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    where = "child process" if args.sandbox_process else "same process and event loop"
    print(f"# Digital River client → sandbox ({where}); {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"aiohttp {aiohttp.__version__}, {args.seconds:g} s per run, median of {args.repeat}\n")
    print("| sandbox latency | concurrency | workload | requests/s (min–max) | operations/s | bound | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    starter = sandbox_process if args.sandbox_process else sandbox_in_process
    async with starter(0) as (url, set_latency):
        for latency_ms, concurrency in scenarios:
            await set_latency(latency_ms)
            for workload in ("checkout", "pair"):
                runs = sorted([await run_workload(url, workload, latency_ms, concurrency, args.seconds)
                               for _ in range(args.repeat)], key=lambda r: r.requests_per_second)
                r = runs[len(runs) // 2]
                spread = (f" ({runs[0].requests_per_second:,.0f}–{runs[-1].requests_per_second:,.0f})"
                          if len(runs) > 1 else "")
                unit = "pairs" if workload == "pair" else "checkouts"
                # With a fixed latency no client can beat concurrency / latency requests per second.
                bound = f"{concurrency * 1000 / latency_ms:,.0f}" if latency_ms else "–"
                print(f"| {latency_ms} ms | {concurrency} | {workload} | {r.requests_per_second:,.0f}{spread} | "
                      f"{r.operations_per_second:,.0f} {unit}/s | {bound} | {sum(x.errors for x in runs)} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
