"""`python run.py demo`: a newcomer's first run, with nothing to set up.

Starts an embedded PostgreSQL of its own under DATA_DIR/demo (its `drjobs` database emptied first, so the
engine's own embedded database is never touched) and the local Digital River sandbox in this process, seeds a
realistic book (accounts in several time zones, products, acquisition orders, subscriptions across frequencies,
some due, some behind, a few with bad data or declining cards), runs every job to completion with progress (bars
on a terminal, log lines on a pipe), writes the fulfillment requests an ERP would write for the new orders and
runs the fulfillment jobs, then prints a summary. The engine's own log (the deliberately bad records' errors among
it) goes to DATA_DIR/demo/demo.log, which the summary names, so the terminal shows only progress and the summary.

Then the web console (engine/console), read-only, on the demo's database: when stdout is a terminal (`make demo`),
or with `--console`, the demo serves it on a free loopback port, prints `console: http://127.0.0.1:PORT/` and waits
for Ctrl-C (or SIGTERM) before it stops and drops its database; its Digital River page shows the demo's own
requests. Otherwise (a pipe: tests, scripts) it prints how to get the console (`demo --console`) and exits.

Storefronts (docs/contract.md, Storefronts): `--storefronts N` (1 to 8, default 1) runs the demo with N of them,
`DefaultStore` and then `EU Store`, `UK Store`, …, each with its own key and its own in-process sandbox, which
accepts that key only (DefaultStore's is DR_API_KEY and DR_API_URL, EU Store's DR_API_KEY_EU_STORE and
DR_API_URL_EU_STORE, and so on). The seeded customers are spread over the storefronts in turn (their acquisition
orders and subscriptions name it), and the summary gains a STOREFRONTS section: each storefront's installments
charged and failed, its installment orders and how many of them its own sandbox created, and the fulfillments,
requests and refused keys (401) that sandbox saw. With one storefront the demo is what it always was. The
console's Digital River page shows DefaultStore's client.

Options: `--subscriptions N` (default 2000), `--latency-ms MS` (sandbox latency, default 0), `--storefronts N`
(default 1), `--keep` (leave the demo database in place afterwards and print the `status` command that reads it;
by default it is dropped), `--console` (serve the console after the summary even when stdout is not a terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from engine.app import Engine, JobFactory
from engine.console import Console
from engine.console.dr_view import DrSampler
from engine.database import EMBEDDED_DATABASE, open_database
from engine.http import HttpServer
from engine.jobs import Job
from engine.logs import get_logger
from engine.settings import DEFAULT_STOREFRONT, JOBS, STOREFRONT_SETTING_PREFIXES, Settings, load, storefront_label
from engine.store import Store, load_queries
from sandbox.config import SandboxConfig
from sandbox.server import Sandbox

# The demo's own statements (seeding a book, writing an ERP's fulfillment requests, the summary), kept beside it and
# out of engine/sql/, which holds only what production runs.
DEMO_SQL = load_queries([Path(__file__).with_name("demo.sql")])

log = get_logger(component="demo")
DEMO_DATABASE = EMBEDDED_DATABASE  # on the demo's own embedded server, under DATA_DIR/demo
DEMO_KEY = "sk_test_demo_local_sandbox"
# The storefronts `--storefronts N` runs with: the first N of these, DefaultStore (DR_API_KEY) first.
DEMO_STOREFRONTS = (DEFAULT_STOREFRONT, "EU Store", "UK Store", "APAC Store", "LATAM Store", "Canada Store",
                    "Japan Store", "Nordics Store")
MAX_STOREFRONTS = len(DEMO_STOREFRONTS)
USAGE = "usage: python run.py demo [--subscriptions N] [--latency-ms MS] [--storefronts N] [--keep] [--console]"
# The console's Digital River page samples the demo's client every second (the demo's runs last seconds).
DEMO_SAMPLE_SECONDS = 1.0
READ_ONLY = ("This is the demo's console: read-only, on the demo's own database, which the demo drops when it stops "
             "(unless --keep). `drjobs serve` with ADMIN_TOKEN set serves a console that can retry, pause and resume.")


class DemoUsageError(ValueError):
    pass


@dataclass
class DemoOptions:
    subscriptions: int = 2000
    latency_ms: float = 0.0
    storefronts: int = 1
    keep: bool = False
    console: bool = False


def parse_options(argv: Sequence[str]) -> DemoOptions:
    """The demo's flags; DemoUsageError names the bad one."""
    options = DemoOptions()
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--keep":
            options.keep = True
        elif flag == "--console":
            options.console = True
        elif flag in ("--subscriptions", "--latency-ms", "--storefronts"):
            if not args:
                raise DemoUsageError(f"{flag} needs a value; {USAGE}")
            value = args.pop(0)
            allowed = {"--subscriptions": "1 to 200000", "--latency-ms": "0 to 10000",
                       "--storefronts": f"1 to {MAX_STOREFRONTS}"}[flag]
            try:
                if flag == "--subscriptions":
                    options.subscriptions = int(value)
                    if not 1 <= options.subscriptions <= 200_000:
                        raise ValueError
                elif flag == "--storefronts":
                    options.storefronts = int(value)
                    if not 1 <= options.storefronts <= MAX_STOREFRONTS:
                        raise ValueError
                else:
                    options.latency_ms = float(value)
                    if not 0 <= options.latency_ms <= 10_000:
                        raise ValueError
            except ValueError:
                raise DemoUsageError(f"{flag} {value!r}: expected a number from {allowed}") from None
        else:
            raise DemoUsageError(f"unknown option {flag!r}; {USAGE}")
    return options


def demo_dir(data_dir: str) -> Path:
    """Where the demo keeps its embedded server and its log: DATA_DIR/demo, absolute."""
    return Path(data_dir).absolute() / "demo"


def demo_log_path(data_dir: str) -> Path:
    return demo_dir(data_dir) / "demo.log"


def demo_key(storefront: str) -> str:
    """The demo's key for `storefront`, which its sandbox alone accepts: DEMO_KEY for DefaultStore,
    `sk_test_demo_eu_store` for EU Store."""
    return DEMO_KEY if storefront == DEFAULT_STOREFRONT else f"sk_test_demo_{storefront_label(storefront).lower()}"


def setting_suffix(storefront: str) -> str:
    """What the storefront's variables end with: '' for DefaultStore (DR_API_KEY), `_EU_STORE` for EU Store."""
    return "" if storefront == DEFAULT_STOREFRONT else f"_{storefront_label(storefront)}"


def demo_settings(sandbox_urls: str | Mapping[str, str], env: dict[str, str] | None = None) -> Settings:
    """The operator's settings, with the store, Digital River and the rate budget pointed at the demo's own: one
    sandbox URL (DefaultStore's), or each storefront's sandbox URL by storefront name, each storefront with its
    `demo_key`. The operator's own storefront variables (DR_API_KEY_<STORE>, …) are left out: the demo never
    talks to a Digital River of theirs."""
    urls = {DEFAULT_STOREFRONT: sandbox_urls} if isinstance(sandbox_urls, str) else dict(sandbox_urls)
    base = {name: value for name, value in (os.environ if env is None else env).items()
            if not name.startswith(STOREFRONT_SETTING_PREFIXES)}
    for name in ("DATABASE_URL", "DR_API_KEY", "DR_API_URL", "DR_MAX_REQUESTS_PER_SECOND", "DR_API_VERSION"):
        base.pop(name, None)
    for storefront, url in urls.items():
        suffix = setting_suffix(storefront)
        base.update({f"DR_API_KEY{suffix}": demo_key(storefront), f"DR_API_URL{suffix}": url,
                     f"DR_MAX_REQUESTS_PER_SECOND{suffix}": "2000"})
    return load(base, command="drain")


class Progress:
    """Per-job progress: redrawn bars on a terminal, a log line every few seconds on a pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.rows: dict[str, tuple[int, int]] = {}
        self._last_line = 0.0
        self._drawn = 0

    def update(self, job: str, done: int, total: int) -> None:
        self.rows[job] = (done, total)
        if self.tty:
            self._draw()
        elif time.monotonic() - self._last_line > 2 or done >= total:
            self._last_line = time.monotonic()
            self.out.write(f"  {job:<26} {done}/{total}\n")
            self.out.flush()

    def _draw(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F")
        for job, (done, total) in self.rows.items():
            share = done / total if total else 1.0
            bar = "█" * int(share * 30) + "·" * (30 - int(share * 30))
            self.out.write(f"\x1b[2K  {job:<26} {bar} {done:>6}/{total:<6}\n")
        self._drawn = len(self.rows)
        self.out.flush()


async def _drop_database(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
    finally:
        await conn.close()


async def _fresh_database(admin_dsn: str) -> None:
    """An empty demo database (a kept one from an earlier `--keep` run is replaced)."""
    await _drop_database(admin_dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
    finally:
        await conn.close()


async def seed(store: Store, subscriptions: int, storefronts: Sequence[str] = (DEFAULT_STOREFRONT,)) -> None:
    """The demo's book of accounts, payments, acquisition orders and subscriptions; the customers' orders and
    subscriptions at `storefronts` in turn."""
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute(DEMO_SQL["demo_products"])
        for name in ("demo_accounts", "demo_stored_payments"):
            await conn.execute(DEMO_SQL[name], subscriptions)
        await conn.execute(DEMO_SQL["demo_acquisition_orders"], subscriptions, list(storefronts))
        for name in ("demo_acquisition_items", "demo_subscriptions"):
            await conn.execute(DEMO_SQL[name], subscriptions)


async def write_fulfillment_requests(store: Store) -> None:
    """What an ERP writes once installment orders exist: a fulfillment request per order, and its lines."""
    await store.pool.execute(DEMO_SQL["demo_fulfillment_requests"])
    await store.pool.execute(DEMO_SQL["demo_line_fulfillment_requests"])


async def _fetch(store: Store, name: str) -> list[Any]:
    return list(await store.pool.fetch(DEMO_SQL[name]))


async def run_to_completion(job: Job, progress: Progress) -> None:
    """Run `job` until nothing is due for it (records waiting for a later attempt are not due)."""
    total = await job.due_count()
    while True:
        due = await job.due_count()
        if not due or job.stop_requested:
            break
        progress.update(job.job_name, max(0, total - due), total)
        run = await job.run_now("drain")
        if run is None or run.claimed == 0:
            break
        if run.status != "succeeded":
            raise RuntimeError(f"{job.job_name} run failed: {run.error}")
    progress.update(job.job_name, total, total)


async def demo(argv: Sequence[str], build_jobs: JobFactory, out: TextIO = sys.stdout,
               clock: Callable[[], float] = time.monotonic) -> int:
    """The whole demo; 0 when every job ran to completion."""
    options = parse_options(argv)
    started = clock()
    async with contextlib.AsyncExitStack() as sandboxes_open:
        # Each storefront's own Digital River, accepting its key only.
        sandboxes: dict[str, Sandbox] = {}
        for storefront in DEMO_STOREFRONTS[:options.storefronts]:
            sandboxes[storefront] = await sandboxes_open.enter_async_context(Sandbox(SandboxConfig(
                api_key=demo_key(storefront), latency_ms=options.latency_ms, seed=len(sandboxes) + 1)))
        sandbox = sandboxes[DEFAULT_STOREFRONT]
        settings = demo_settings({storefront: sb.url for storefront, sb in sandboxes.items()})
        here = demo_dir(settings.data_dir)
        database = await open_database(None, str(here))
        try:
            admin = database.server.get_uri("postgres")
            await _fresh_database(admin)
            store = await Store.connect(database.server.get_uri(DEMO_DATABASE), settings.node_name,
                                        max_size=settings.database_pool_size)
            samplers: dict[str, DrSampler] = {}
            try:
                await store.migrate()
                if len(sandboxes) == 1:
                    out.write(f"drjobs demo: {options.subscriptions} subscriptions, Digital River sandbox at "
                              f"{sandbox.url}, latency {options.latency_ms:g} ms\n")
                else:
                    out.write(f"drjobs demo: {options.subscriptions} subscriptions over {len(sandboxes)} storefronts, "
                              f"latency {options.latency_ms:g} ms\n")
                    for storefront, sb in sandboxes.items():
                        suffix = setting_suffix(storefront)
                        out.write(f"  {storefront:<14} sandbox at {sb.url}, accepting only its own key "
                                  f"(DR_API_KEY{suffix}, DR_API_URL{suffix})\n")
                await seed(store, options.subscriptions, list(sandboxes))
                engine = Engine(settings, store, build_jobs)
                samplers = {front.label: DrSampler(front.client, interval=DEMO_SAMPLE_SECONDS)
                            for front in engine.storefronts}
                for sampler in samplers.values():
                    sampler.start()
                progress = Progress(out)
                timings: dict[str, float] = {}

                async def work() -> int:
                    for name in JOBS:
                        job = engine.jobs.get(name)
                        if job is None:
                            continue
                        if name == "order-fulfillment":
                            await write_fulfillment_requests(store)
                        t0 = clock()
                        await run_to_completion(job, progress)
                        timings[name] = clock() - t0
                    return 0

                code = await engine.drive(work)
                summary = await summarize(store, sandboxes, timings, clock() - started)
                out.write("\n" + summary + "\n")
                out.write(f"  engine log (each record's errors) {demo_log_path(settings.data_dir)}\n")
                if options.console or out.isatty():
                    console = Console(settings, store, built=set(engine.jobs), samplers=samplers,
                                      read_only_reason=READ_ONLY)
                    await serve_console(console, engine, out)
                else:
                    out.write(f"  web console: `{status_command()} demo --console` runs the demo and then serves "
                              "these pages at http://127.0.0.1:PORT/ until Ctrl-C (a terminal gets it without "
                              "--console)\n")
            finally:
                for sampler in samplers.values():
                    await sampler.stop()
                await store.close()
            if not options.keep:
                await _drop_database(admin)
            else:
                out.write(f"\ndemo data kept in the embedded database under {here / 'pg'}; to look at it:\n"
                          f"  DATA_DIR={shlex.quote(str(here))} {status_command()} status\n")
        finally:
            await database.close()
    return code


async def serve_console(console: Console, engine: Engine, out: TextIO) -> None:
    """Serve `console` on a free loopback port until SIGINT or SIGTERM, having printed its address."""
    server = HttpServer("127.0.0.1", 0, engine.metrics, engine.health, console=console)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        out.write(f"\nconsole: http://127.0.0.1:{server.port}/\n  (read-only, the demo's results; Ctrl-C to stop)\n")
        out.flush()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


def status_command() -> str:
    """How this demo was started, to repeat for `status`: `drjobs`, or `python run.py` from a checkout."""
    if os.path.basename(sys.argv[0] or "") == "run.py":
        return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(sys.argv[0]))}"
    return "drjobs"


async def summarize(store: Store, sandboxes: Mapping[str, Sandbox], timings: dict[str, float],
                    elapsed: float) -> str:
    """The summary table: installments made, charged, declined, failed and why, fulfillments, each storefront's
    share (with more than one: `sandboxes` by storefront name), rates."""
    lines = ["SUMMARY", ""]
    by_status = {r["status"]: r for r in await _fetch(store, "demo_summary_records")}
    made = sum(r["records"] for r in by_status.values())
    charged = by_status.get("Successful")
    waiting = by_status.get("Open")
    failed = by_status.get("Failed")
    lines.append(f"  installments made            {made}")
    lines.append(f"  charged                      {charged['records'] if charged else 0}"
                 f"   (USD {charged['amount'] if charged else 0} with tax)")
    lines.append(f"  declined, retry in a day     {waiting['retried'] if waiting else 0}")
    lines.append(f"  waiting for a later attempt  {(waiting['records'] - waiting['retried']) if waiting else 0}")
    lines.append(f"  failed                       {failed['records'] if failed else 0}")
    failures = await _fetch(store, "demo_summary_failures")
    if failures:
        lines += ["", "  WHY RECORDS FAILED OR WAIT"]
        for row in failures:
            example = (row["example"] or "")[:80]
            lines.append(f"  {row['records']:>6}  {row['status']:<7} {row['code']:<36} {example}")
    fulfillments = await _fetch(store, "demo_summary_fulfillments")
    if fulfillments:
        lines += ["", "  FULFILLMENTS"]
        for row in fulfillments:
            lines.append(f"  {row['kind']:<22} {row['status']:<10} {row['count']}")
    if len(sandboxes) > 1:
        lines += ["", *await summarize_storefronts(store, sandboxes)]
    requests = sum(sandbox.ledger.count_requests() for sandbox in sandboxes.values())
    busy = sum(timings.values()) or 1e-9
    lines += ["", f"  Digital River requests       {requests} ({requests / busy:.0f}/s while jobs ran)"]
    for job, seconds in timings.items():
        lines.append(f"  {job:<28} {seconds:.1f} s")
    lines.append(f"  elapsed                      {elapsed:.1f} s")
    return "\n".join(lines)



async def summarize_storefronts(store: Store, sandboxes: Mapping[str, Sandbox]) -> list[str]:
    """Each storefront's installment records and orders from the database, and what its own sandbox saw: how many
    of the storefront's installment orders that sandbox created (all of them when each storefront's records went
    to its own Digital River), its fulfillments, its requests and the requests it refused (401: another key)."""
    records = {r["storefront"]: r for r in await _fetch(store, "demo_summary_storefronts")}
    orders: dict[str, list[str]] = {}
    for row in await _fetch(store, "demo_summary_storefront_orders"):
        orders.setdefault(row["storefront"], []).append(row["dr_order_id"])
    lines = ["  STOREFRONTS (each with its own key and its own sandbox)",
             f"  {'':<14} {'charged':>8} {'failed':>7} {'orders':>7} {'at its sandbox':>15} "
             f"{'fulfillments':>13} {'requests':>9} {'refused (401)':>14}"]
    for storefront, sandbox in sandboxes.items():
        row = records.get(storefront)
        mine = orders.get(storefront, [])
        at_own = sum(1 for order_id in mine if order_id in sandbox.ledger.orders)
        lines.append(f"  {storefront:<14} {row['charged'] if row else 0:>8} {row['failed'] if row else 0:>7} "
                     f"{len(mine):>7} {at_own:>15} {len(sandbox.ledger.fulfillments):>13} "
                     f"{sandbox.ledger.count_requests():>9} {sandbox.ledger.count_requests(status=401):>14}")
    return lines
