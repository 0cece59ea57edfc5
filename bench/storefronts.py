"""Benchmark (not a test): recurring-payments over several storefronts, each with its own rate-limited sandbox.

Issue 17: four storefronts, each a sandbox process enforcing 250 requests/s at 300 ms latency and accepting only its
own key; N installments (default 20,000) due now, spread evenly over them; one engine process (or two, sharing
the database) charging them all. Reported per storefront, from its sandbox's ledger: requests, requests/s over its
busy interval (first to last request) against its limit, the 1-second bins, 429s; and for the engine: wall time,
CPU seconds (user + sys, `wait4` rusage of each engine process alone), CPU % of wall, peak RSS and installments/s.
Also the sandboxes' and PostgreSQL's CPU, and the whole machine's (/proc/stat), since all share the cores.

    .venv/bin/python bench/storefronts.py                          # 20,000 installments, 4 storefronts, 1 process
    .venv/bin/python bench/storefronts.py --processes 2            # the same backlog charged by two processes
    .venv/bin/python bench/storefronts.py --n 2000 --json out.json
    .venv/bin/python bench/storefronts.py --reuse --profile /tmp/storefronts.json   # py-spy of the payment run
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/storefronts.py

Each run: a database seeded with N subscriptions due (`Store 1` … `Store K`, round robin), one untimed
`run subscription-installments` that makes their installment records, then the sandboxes' ledgers are emptied and
the measured `run recurring-payments` process(es) start together (`run`, not `drain`: drain would also run
digital-river-events, whose GET /events polls spend the same storefronts' budgets). The seeded database (after the
installment run) is kept as a template, so `--reuse` starts the next run from a copy of it instead of seeding again.
`--dump-requests DIR` keeps each sandbox's request log and the engines' log lines for a closer look.

Without BENCH_DATABASE_URL the embedded PostgreSQL under .data/bench is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    database_server,
    free_port,
    fresh_database,
    run_engine,
    wait_for_sandbox,
    with_database,
)
from engine.settings import storefront_label  # noqa: E402

DATABASE = "drjobs_bench_storefronts"
SEED_CHUNK = 100_000

# bench/pipeline.py's seed, each subscription (and its parent order) on storefront `Store ((i - 1) mod K) + 1`.
SEED = """
WITH acc AS (
    INSERT INTO accounts (name, dr_customer_id, email, bill_to)
    SELECT 'Bench ' || i, 'cus_bench_' || i, 'b' || i || '@bench.example',
           '{"address": {"country": "US", "postalCode": "55401"}, "name": "Bench"}'::jsonb
      FROM generate_series($2::int + 1, $2::int + $1::int) i
    RETURNING id
), prod AS (
    INSERT INTO products (sku, name, dr_sku_id) VALUES ('BENCH-1', 'Bench plan', 'sku_bench')
        ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name RETURNING id
), pay AS (
    INSERT INTO stored_payments (account_id, dr_source_id)
    SELECT id, 'src_bench_' || id FROM acc
    RETURNING id, account_id
), ord AS (
    INSERT INTO orders (account_id, dr_order_id, currency, ship_to, storefront)
    SELECT id, 'ord_bench_' || id, 'USD', '{"address": {"country": "US"}}'::jsonb,
           'Store ' || ((id - 1) % $3::int + 1) FROM acc RETURNING id, account_id, storefront
)
INSERT INTO subscriptions (account_id, product_id, stored_payment_id, parent_order_id, quantity, unit_price,
                           currency, installment_frequency, installment_anchor_date, installment_next_run_date,
                           installment_count_remaining, dr_billing_agreement_id, storefront)
SELECT ord.account_id, prod.id, pay.id, ord.id, 1, 19.00, 'USD', 'Monthly', current_date - 1, current_date - 1,
       12, 'ba_bench_' || ord.account_id, ord.storefront
  FROM ord JOIN pay ON pay.account_id = ord.account_id CROSS JOIN prod
"""


def store_name(i: int) -> str:
    return f"Store {i}"


def store_key(i: int) -> str:
    return f"sk_test_bench_store{i}_only"


# ---------------------------------------------------------------------------------------------------------------
# CPU accounting outside the engine: the machine (/proc/stat) and the PostgreSQL server (its postmaster's tree).

def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from `state` on (the 3rd field)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of process `root`, its reaped children and its live children (PostgreSQL: the postmaster's
    backends, which it reaps as they exit)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = _stat(root)
    if fields is None:
        return float("nan")
    jiffies = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _stat(int(entry))
            if child is not None and int(child[1]) == root:
                jiffies += int(child[11]) + int(child[12])
    return jiffies / tick


async def postmaster_pid(dsn: str) -> int | None:
    """The PostgreSQL server's postmaster on this machine (the parent of a backend), or None if not local."""
    conn = await asyncpg.connect(dsn)
    try:
        fields = _stat(int(await conn.fetchval("SELECT pg_backend_pid()")))  # while the backend lives
    finally:
        await conn.close()
    return None if fields is None else int(fields[1])


# ---------------------------------------------------------------------------------------------------------------
# Sandboxes

@dataclass
class Sandbox:
    index: int
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return store_name(self.index)

    @property
    def label(self) -> str:
        return storefront_label(self.name)


def start_sandboxes(count: int, rate: float, latency_ms: float) -> list[Sandbox]:
    sandboxes = []
    for i in range(1, count + 1):
        port = free_port()
        args = [sys.executable, str(ROOT / "run.py"), "sandbox", "--port", str(port), "--latency-ms", str(latency_ms),
                "--rate-limit", str(rate), "--api-key", store_key(i), "--no-amount-rules"]
        proc = subprocess.Popen(args, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "LOG_LEVEL": "warning"})
        sandboxes.append(Sandbox(i, port, proc))
    return sandboxes


def write_file(directory: str, name: str, text: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / name).write_text(text)


def stop_sandboxes(sandboxes: list[Sandbox]) -> dict[str, float]:
    """Terminate them; each one's CPU seconds over its life."""
    cpu = {}
    for sandbox in sandboxes:
        if sandbox.proc.returncode is None:
            sandbox.proc.terminate()
            _, _, usage = os.wait4(sandbox.proc.pid, 0)
            sandbox.proc.returncode = 0
            cpu[sandbox.name] = usage.ru_utime + usage.ru_stime
    return cpu


async def check_keys(http: aiohttp.ClientSession, sandboxes: list[Sandbox]) -> None:
    """Each sandbox answers 401 to another storefront's key (the storefronts are kept apart), then forgets it."""
    async def probe(sandbox: Sandbox) -> None:
        other = store_key(sandbox.index % len(sandboxes) + 1)
        if other == store_key(sandbox.index):
            return
        async with http.post(f"{sandbox.url}/checkouts", json={}, headers={"Authorization": f"Bearer {other}"}) as r:
            if r.status != 401:
                raise SystemExit(f"the sandbox of {sandbox.name} answered {r.status} to another storefront's key")
    await asyncio.gather(*(probe(s) for s in sandboxes))


async def reset_ledgers(http: aiohttp.ClientSession, sandboxes: list[Sandbox]) -> None:
    for sandbox in sandboxes:
        async with http.post(f"{sandbox.url}/_sandbox/reset") as r:
            r.raise_for_status()


# ---------------------------------------------------------------------------------------------------------------
# The engine

def engine_env(dsn: str, sandboxes: list[Sandbox], rate: float, concurrency: int, limit: int,
               pool_size: int) -> dict[str, str]:
    """An engine on `dsn` with a key, URL and rate budget per storefront and none for DefaultStore."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DR_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": dsn, "LOG_LEVEL": "warning", "DATABASE_POOL_SIZE": str(pool_size),
                "RECURRING_PAYMENTS_CONCURRENCY": str(concurrency),
                "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT": str(limit), "RECURRING_PAYMENT_BATCH_SIZE": "100",
                "CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT": str(limit), "CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE": "500"})
    for sandbox in sandboxes:
        env[f"DR_API_KEY_{sandbox.label}"] = store_key(sandbox.index)
        env[f"DR_API_URL_{sandbox.label}"] = sandbox.url
        env[f"DR_MAX_REQUESTS_PER_SECOND_{sandbox.label}"] = f"{rate:g}"
    return env


@dataclass
class EngineRun:
    pid: int
    wall: float
    cpu: float
    rss_mb: float


def _profile_file(profile: str, i: int, count: int) -> str:
    if count == 1:
        return profile
    path = Path(profile)
    return str(path.with_name(f"{path.stem}.{i}{path.suffix}"))


async def run_engines(count: int, env: dict[str, str], profile: str | None,
                      keep_logs: str | None = None) -> list[EngineRun]:
    """`count` processes of `run.py run recurring-payments`, started together, each waited for with `wait4`. Their
    output (log lines at LOG_LEVEL=warning) goes to KEEP_LOGS/engine-N.log when `keep_logs` is given."""
    procs = []
    logs = []
    for i in range(1, count + 1):
        command = [sys.executable, str(ROOT / "run.py"), "run", "recurring-payments"]
        if profile:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            command = [py_spy, "record", "--format", "speedscope", "--rate", "200",
                       "-o", _profile_file(profile, i, count), "--", *command]
        log = tempfile.TemporaryFile()
        logs.append(log)
        procs.append((time.monotonic(), subprocess.Popen(command, env={**env, "NODE_NAME": f"bench-{i}"},
                                                        cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)))

    def wait(started: float, proc: subprocess.Popen[bytes]) -> EngineRun:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return EngineRun(proc.pid, time.monotonic() - started, usage.ru_utime + usage.ru_stime,
                         usage.ru_maxrss / 1024)

    runs = await asyncio.gather(*(asyncio.to_thread(wait, started, proc) for started, proc in procs))
    for i, ((_, proc), log) in enumerate(zip(procs, logs, strict=True), start=1):
        log.seek(0)
        err = log.read().decode(errors="replace")
        log.close()
        if keep_logs:
            write_file(keep_logs, f"engine-{i}.log", err)
        if proc.returncode != 0:
            raise SystemExit(f"engine process {proc.pid} exited {proc.returncode}: {err[-3000:]}")
        if err.strip():
            lines = err.strip().splitlines()
            print(f"  engine {proc.pid} logged {len(lines)} lines at warning or above, the last: {lines[-1][:300]}",
                  flush=True)
    return list(runs)


# ---------------------------------------------------------------------------------------------------------------
# Figures

@dataclass
class StoreFigures:
    storefront: str
    limit: float
    requests: int
    statuses: dict[str, int]
    throttled: int
    first: float
    last: float
    busy_seconds: float
    requests_per_second: float
    percent_of_limit: float
    bins: list[int]
    throttled_bins: list[int]
    endpoints: dict[str, int]
    steady_median: float
    steady_min: int
    max_in_any_second: int
    charged: int = 0


def store_figures(name: str, limit: float, requests: list[dict[str, Any]]) -> StoreFigures:
    """Figures from a sandbox ledger's requests (each stamped with the time its answer was ready)."""
    times = sorted(r["at"] for r in requests)
    statuses = Counter(str(r["status"]) for r in requests)
    endpoints = Counter(f"{r['method']} {_endpoint(r['path'])} {r['status']}" for r in requests)
    if len(times) < 2:
        return StoreFigures(name, limit, len(times), dict(statuses), statuses.get("429", 0), 0.0, 0.0, 0.0, 0.0, 0.0,
                            [], [], dict(endpoints), 0.0, 0, len(times))
    first, last = times[0], times[-1]
    busy = last - first
    rate = (len(times) - 1) / busy if busy > 0 else 0.0
    bins = [0] * (int(busy) + 1)
    throttled_bins = [0] * (int(busy) + 1)
    for t in times:
        bins[int(t - first)] += 1
    for r in requests:
        if r["status"] == 429:
            throttled_bins[int(r["at"] - first)] += 1
    # Whole seconds away from the start and the end (ramp-up, the run's tail, and the partial last bin).
    steady = bins[1:-2] or bins
    # The most answers in any 1-second window (sliding): two pointers over the sorted times.
    most = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    return StoreFigures(name, limit, len(times), dict(sorted(statuses.items())), statuses.get("429", 0), first, last,
                        busy, rate, 100 * rate / limit, bins, throttled_bins, dict(sorted(endpoints.items())),
                        statistics.median(steady), min(steady), most)


def _endpoint(path: str) -> str:
    """`/checkouts/abc/sources/src` → `/checkouts/{id}/sources/{id}`."""
    parts = path.strip("/").split("/")
    return "/" + "/".join(p if i % 2 == 0 else "{id}" for i, p in enumerate(parts))


@dataclass
class Result:
    n: int
    storefronts: int
    processes: int
    rate: float
    latency_ms: float
    engine_rate: float
    concurrency: int
    pool_size: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stores: list[StoreFigures]
    engines: list[EngineRun]
    wall: float
    engine_cpu: float
    engine_rss_mb: float
    charged: int
    failed: int
    installments_per_second_wall: float
    installments_per_second_busy: float
    total_requests_per_second: float
    sandbox_cpu: dict[str, float]
    postgres_cpu: float
    postgres_stats: dict[str, int]
    machine_busy_percent: float
    cores: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    installments_job: dict[str, float] = field(default_factory=dict)


def print_result(r: Result) -> None:
    print()
    print(f"{r.n:,} installments over {r.storefronts} storefronts, {r.processes} engine process(es), sandbox limit "
          f"{r.rate:g}/s at {r.latency_ms:g} ms, RECURRING_PAYMENTS_CONCURRENCY={r.concurrency} per storefront, "
          f"DATABASE_POOL_SIZE={r.pool_size}"
          + ("" if r.engine_rate == r.rate else f", engine DR_MAX_REQUESTS_PER_SECOND_<STORE>={r.engine_rate:g}"))
    print(f"load average before {r.load_before[0]:.2f} {r.load_before[1]:.2f} {r.load_before[2]:.2f}, "
          f"after {r.load_after[0]:.2f} {r.load_after[1]:.2f} {r.load_after[2]:.2f}")
    print()
    print("| storefront | requests | busy s | requests/s | % of limit | 1-s bins: median / min (steady) | "
          "most in any 1 s | 429s | other statuses | charged |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in r.stores:
        other = ", ".join(f"{k}: {v}" for k, v in s.statuses.items() if k not in ("200", "201", "429")) or "–"
        print(f"| {s.storefront} | {s.requests:,} | {s.busy_seconds:.1f} | {s.requests_per_second:.1f} | "
              f"{s.percent_of_limit:.1f}% | {s.steady_median:g} / {s.steady_min} | {s.max_in_any_second} | "
              f"{s.throttled} | {other} | {s.charged:,} |")
    print()
    print("| processes | wall s | engine CPU s | engine CPU % of wall | peak RSS MB | installments/s (wall) | "
          "installments/s (busy) | requests/s (all) | sandboxes CPU s | PostgreSQL CPU s | machine busy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {r.processes} | {r.wall:.1f} | {r.engine_cpu:.1f} | {100 * r.engine_cpu / r.wall:.0f}% | "
          f"{r.engine_rss_mb:.0f} | {r.installments_per_second_wall:.0f} | {r.installments_per_second_busy:.0f} | "
          f"{r.total_requests_per_second:.0f} | {sum(r.sandbox_cpu.values()):.1f} | {r.postgres_cpu:.1f} | "
          f"{r.machine_busy_percent:.0f}% of {r.cores} cores |")
    if r.processes > 1:
        for e in r.engines:
            print(f"  process {e.pid}: {e.wall:.1f} s, {e.cpu:.1f} CPU s ({100 * e.cpu / e.wall:.0f}%), "
                  f"{e.rss_mb:.0f} MB")
    endpoints: Counter[str] = Counter()
    for s in r.stores:
        endpoints.update(s.endpoints)
    print("  requests by endpoint and status, all storefronts: "
          + ", ".join(f"{k}: {v:,}" for k, v in sorted(endpoints.items())))
    st = r.postgres_stats
    if r.charged:
        print(f"  PostgreSQL per installment: {st['xact_commit'] / r.charged:.2f} commits, "
              f"{st['tup_updated'] / r.charged:.2f} rows updated, {st['tup_inserted'] / r.charged:.2f} inserted, "
              f"{st['tup_fetched'] / r.charged:.1f} fetched, {st['tup_returned'] / r.charged:.1f} returned, "
              f"{st['blks_hit'] / r.charged:.0f} buffer hits; "
              f"{r.postgres_cpu / r.charged * 1000:.2f} ms CPU (engine {r.engine_cpu / r.charged * 1000:.2f} ms, "
              f"sandboxes {sum(r.sandbox_cpu.values()) / r.charged * 1000:.2f} ms)")
        reads = sorted(((v, k[6:]) for k, v in st.items() if k.startswith("index:") and v), reverse=True)[:4]
        print("  index tuples read per installment: " + ", ".join(f"{k} {v / r.charged:.1f}" for v, k in reads))
        seq = sorted(((v, k[8:]) for k, v in st.items() if k.startswith("seqrows:") and v), reverse=True)[:5]
        print("  sequential scans: " + (", ".join(f"{k} {st['seqscans:' + k]:,} scans reading {v:,} rows"
                                                  for v, k in seq) or "none"))
        for k, v in sorted(st.items()):
            if k.startswith("calls:") and v:
                name = k[6:]
                print(f"  function {name}: {v:,} calls ({v / r.charged:.2f} per installment), "
                      f"{st.get('ms:' + name, 0) / 1000:.1f} s in all")
    for run in r.runs:
        print(f"  run {run['id']} on {run['node']}: {run['seconds']:.1f} s, claimed {run['claimed']}, "
              f"succeeded {run['succeeded']}, failed {run['failed']}, {run['status']}")
    if r.failed:
        print(f"  note: {r.failed} installment records Failed")
    if r.charged != r.n:
        print(f"  note: {r.charged:,} of {r.n:,} charged")
    worst = min(s.percent_of_limit for s in r.stores)
    throttled = sum(s.throttled for s in r.stores)
    met = worst >= 97.0 and throttled == 0
    print(f"  target (every storefront >= 97% of its limit, zero 429s): {'met' if met else 'NOT met'} "
          f"(lowest {worst:.1f}%, {throttled} 429s)")


# ---------------------------------------------------------------------------------------------------------------
# The run

async def _track_functions(conn: asyncpg.Connection, track: bool) -> None:
    """pg_stat_user_functions for the run database's SQL functions (the claim window), or not."""
    value = "'all'" if track else "DEFAULT"
    await conn.execute(f'ALTER DATABASE "{DATABASE}" SET track_functions = {value}')


async def prepare_database(server_dsn: str, n: int, storefronts: int, reuse: bool, env_for: Any,
                           track: bool = False) -> tuple[str, dict[str, float]]:
    """The run's database: a copy of the template when `reuse` finds one of this size, else seeded afresh (and
    the template saved). Returns its dsn and the installment run's figures (empty when copied)."""
    dsn = with_database(server_dsn, DATABASE)
    tag = f"n={n} storefronts={storefronts} seed=2"  # seed=2: the empty tables are left unanalyzed
    template = f"{DATABASE}_seed_{n}_{storefronts}"
    conn = await asyncpg.connect(server_dsn)
    try:
        found = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", template)
        if reuse and found == tag:
            started = time.monotonic()
            await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{DATABASE}" TEMPLATE "{template}"')
            await _track_functions(conn, track)
            print(f"  copied the seeded database ({tag}) in {time.monotonic() - started:.1f} s", flush=True)
            return dsn, {}
        if reuse:
            print(f"  no seeded database of {tag} to reuse (found: {found}): seeding", flush=True)
    finally:
        await conn.close()
    started = time.monotonic()
    await fresh_database(server_dsn, DATABASE, *[(SEED, min(SEED_CHUNK, n - s), s, storefronts)
                                                 for s in range(0, n, SEED_CHUNK)])
    print(f"  seeded {n:,} subscriptions in {time.monotonic() - started:.1f} s", flush=True)
    wall, cpu, rss = run_engine(["run", "subscription-installments"], env_for(dsn))
    print(f"  subscription-installments: {wall:.1f} s, {cpu:.1f} CPU s", flush=True)
    # Statistics for the tables with rows. Not for the empty ones: payment_attempts analyzed while empty is planned
    # as empty for the whole run (a sequential scan of it per record charged, 22 million rows read at 20,000), until
    # autovacuum analyzes it; a live store has history there, and a never-analyzed table is planned with the index.
    conn = await asyncpg.connect(dsn)
    try:
        for table in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            if await conn.fetchval(f'SELECT EXISTS (SELECT FROM "{table[0]}")'):
                await conn.execute(f'ANALYZE "{table[0]}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{template}" TEMPLATE "{DATABASE}"')
        await conn.execute(f"COMMENT ON DATABASE \"{template}\" IS '{tag}'")
        await _track_functions(conn, track)
    finally:
        await conn.close()
    return dsn, {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss}


async def benchmark(args: argparse.Namespace, server_dsn: str) -> Result:
    sandboxes = start_sandboxes(args.storefronts, args.rate, args.latency_ms)
    sandbox_cpu: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            for sandbox in sandboxes:
                await wait_for_sandbox(http, sandbox.url)
            await check_keys(http, sandboxes)

            def env_for(dsn: str) -> dict[str, str]:
                return engine_env(dsn, sandboxes, args.engine_rate or args.rate, args.concurrency, args.n,
                                  args.pool_size)

            dsn, installments_job = await prepare_database(server_dsn, args.n, args.storefronts, args.reuse, env_for,
                                                             args.track_functions)
            due = await _fetch(dsn, "SELECT count(*) FROM subscription_process_data "
                                    "WHERE subscription_job_run_status = 'Open'")
            if int(due[0][0]) != args.n:
                raise SystemExit(f"expected {args.n} open installment records, found {due[0][0]}")
            await reset_ledgers(http, sandboxes)
            postmaster = await postmaster_pid(dsn)

            stats0 = await database_stats(dsn)
            load_before = os.getloadavg()
            busy0, total0 = machine_cpu()
            pg0 = tree_cpu_seconds(postmaster) if postmaster else float("nan")
            started = time.monotonic()
            engines = await run_engines(args.processes, env_for(dsn), args.profile, args.dump_requests)
            wall = time.monotonic() - started
            busy1, total1 = machine_cpu()
            pg1 = tree_cpu_seconds(postmaster) if postmaster else float("nan")
            load_after = os.getloadavg()
            stats1 = await database_stats(dsn)

            stores = []
            for sandbox in sandboxes:
                async with http.get(f"{sandbox.url}/_sandbox/ledger") as response:
                    ledger = json.loads(await response.read())
                stores.append(store_figures(sandbox.name, args.rate, ledger["requests"]))
                if args.dump_requests:
                    write_file(args.dump_requests, f"{sandbox.label}.json", json.dumps({
                        "requests": ledger["requests"],
                        "checkouts": {c["id"]: c["createdTime"] for c in ledger["checkouts"]},
                        "orders": [(o["checkoutId"], o["createdTime"]) for o in ledger["orders"]]}))
    finally:
        sandbox_cpu = stop_sandboxes(sandboxes)

    rows = await _fetch(dsn, "SELECT storefront, subscription_job_run_status AS status, count(*) AS n "
                             "FROM subscription_process_data GROUP BY 1, 2")
    charged_by_store = {r["storefront"]: r["n"] for r in rows if r["status"] == "Successful"}
    for s in stores:
        s.charged = int(charged_by_store.get(s.storefront, 0))
    charged = sum(int(r["n"]) for r in rows if r["status"] == "Successful")
    failed = sum(int(r["n"]) for r in rows if r["status"] == "Failed")
    runs = [dict(r) for r in await _fetch(
        dsn, "SELECT id, node, status, claimed, succeeded, failed, "
             "extract(epoch FROM finished_at - started_at)::float AS seconds "
             "FROM job_runs WHERE job = 'recurring-payments' ORDER BY id")]
    busy_start = min(s.first for s in stores if s.requests)
    busy_end = max(s.last for s in stores if s.requests)
    requests = sum(s.requests for s in stores)
    return Result(
        n=args.n, storefronts=args.storefronts, processes=args.processes, rate=args.rate, latency_ms=args.latency_ms,
        engine_rate=args.engine_rate or args.rate,
        concurrency=args.concurrency, pool_size=args.pool_size, load_before=load_before, load_after=load_after,
        stores=stores, engines=engines, wall=wall, engine_cpu=sum(e.cpu for e in engines),
        engine_rss_mb=max(e.rss_mb for e in engines), charged=charged, failed=failed,
        installments_per_second_wall=charged / wall,
        installments_per_second_busy=charged / (busy_end - busy_start),
        total_requests_per_second=(requests - 1) / (busy_end - busy_start),
        sandbox_cpu=sandbox_cpu, postgres_cpu=pg1 - pg0,
        postgres_stats={k: v - stats0.get(k, 0) for k, v in stats1.items()},
        machine_busy_percent=100 * (busy1 - busy0) / (total1 - total0), cores=os.cpu_count() or 0,
        runs=runs, installments_job=installments_job)


async def database_stats(dsn: str) -> dict[str, int]:
    """The run database's cumulative counters, to subtract: pg_stat_database's, each index's tuples read
    (`index:NAME`), each table's sequential scans and the rows they read (`seqscans:NAME`, `seqrows:NAME`), and each
    tracked function's calls and total ms (`calls:NAME`, `ms:NAME`, with --track-functions)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted, "
            "blks_hit, blks_read FROM pg_stat_database WHERE datname = current_database()")
        stats = {k: int(v) for k, v in dict(row).items()}
        for r in await conn.fetch("SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes"):
            stats[f"index:{r['indexrelname']}"] = int(r["idx_tup_read"])
        for r in await conn.fetch("SELECT relname, seq_scan, seq_tup_read FROM pg_stat_user_tables"):
            stats[f"seqscans:{r['relname']}"] = int(r["seq_scan"])
            stats[f"seqrows:{r['relname']}"] = int(r["seq_tup_read"])
        for r in await conn.fetch("SELECT funcname, calls, total_time FROM pg_stat_user_functions"):
            stats[f"calls:{r['funcname']}"] = int(r["calls"])
            stats[f"ms:{r['funcname']}"] = int(r["total_time"])
    finally:
        await conn.close()
    return stats


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def measure(args: argparse.Namespace) -> Result:
    async with database_server() as server_dsn:
        return await benchmark(args, server_dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="installments due (default 20,000)")
    parser.add_argument("--storefronts", type=int, default=4, help="storefronts, each with its sandbox (default 4)")
    parser.add_argument("--rate", type=float, default=250.0,
                        help="each sandbox's limit and each storefront's DR_MAX_REQUESTS_PER_SECOND_<STORE> (250)")
    parser.add_argument("--engine-rate", type=float, metavar="RPS",
                        help="the engine's DR_MAX_REQUESTS_PER_SECOND_<STORE> when not --rate (to try another margin "
                             "under the sandboxes' limit)")
    parser.add_argument("--latency-ms", type=float, default=300.0, help="each sandbox's latency (300)")
    parser.add_argument("--processes", type=int, default=1, choices=(1, 2, 3, 4),
                        help="engine processes charging the backlog together (default 1)")
    parser.add_argument("--concurrency", type=int, default=128,
                        help="RECURRING_PAYMENTS_CONCURRENCY, per storefront and process (default 128)")
    parser.add_argument("--pool-size", type=int, default=20, help="DATABASE_POOL_SIZE (default 20)")
    parser.add_argument("--profile", metavar="FILE",
                        help="record each payment process with py-spy into FILE (FILE.1, FILE.2… for several; "
                             "speedscope JSON); CPU figures then include py-spy's sampling")
    parser.add_argument("--reuse", action="store_true",
                        help="start from a copy of the database the last run of this --n and --storefronts seeded "
                             "(no seeding, no installment run)")
    parser.add_argument("--track-functions", action="store_true",
                        help="track_functions = all on the run database: calls and time of the claim window function "
                             "(costs a little PostgreSQL CPU)")
    parser.add_argument("--dump-requests", metavar="DIR",
                        help="write each sandbox's request log (time answered, method, path, status) and its "
                             "checkouts' and orders' creation times to "
                             "DIR/STORE_N.json, and each engine process's stderr to DIR/engine-N.log")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    args = parser.parse_args()
    if args.n % args.storefronts:
        parser.error("--n must be a multiple of --storefronts")
    result = asyncio.run(measure(args))
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(f"  figures written to {args.json}")


if __name__ == "__main__":
    main()
