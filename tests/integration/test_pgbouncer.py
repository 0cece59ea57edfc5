"""The engine behind PgBouncer in transaction pooling mode (issue 15), with `DATABASE_POOLER=transaction`.

A PgBouncer of the tests' own (`pool_mode = transaction`, fewer server sessions than the engines have connections)
stands in front of the test database. Through it: the installment pipeline charges every installment exactly once,
two `run.py drain` processes share one backlog, `migrate` and `status` work, another process's 429 pause still
arrives (polled, since LISTEN cannot work there), and no session setting is left behind on a server session.

PgBouncer must be installed (Debian: `apt-get install -y pgbouncer`, as .ci/run does); without it these tests are
skipped, saying so.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import asyncpg
import pytest

from engine.store import ARRAY_TYPES, LEASED_TABLES, QUERIES, Store, _init_connection, sql
from sandbox.server import Sandbox
from tests.db import admin, connection, drop_database, fetchval, with_database
from tests.integration.engines import drain, engine_on
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once
from tests.support import engine_env, run_command, sandbox_env, sandbox_fixture

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
# Server sessions per database: fewer than the two engines' pools together (2 × DATABASE_POOL_SIZE 10), so
# sessions really are shared between clients, transaction by transaction.
SERVER_SESSIONS = 8

sandbox = sandbox_fixture(seed=15)


@dataclass
class Bouncer:
    """A running PgBouncer: `url(database)` is that database through it."""

    host: str
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        auth = quote(self.user, safe="") + (":" + quote(self.password, safe="") if self.password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"


def _server(dsn: str) -> tuple[str, int, str, str]:
    """(host or socket directory, port, user, password) of a PostgreSQL URL, as the test fixtures give it."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = unquote(parts.hostname or "") or (query.get("host") or [""])[0] or "localhost"
    port = parts.port or int((query.get("port") or ["5432"])[0])
    user = unquote(parts.username or "") or (query.get("user") or ["postgres"])[0]
    password = unquote(parts.password or "") or (query.get("password") or [""])[0]
    return host, port, user, password


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bouncer(pg_server_dsn: str) -> Iterator[Bouncer]:
    """PgBouncer in transaction pooling mode in front of the test server, on a free port of 127.0.0.1."""
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip(f"PGBOUNCER IS NOT INSTALLED ({PGBOUNCER} missing): the engine behind a transaction pooler is "
                    "NOT tested. Install it: apt-get install -y pgbouncer (.ci/run does)")
    host, port, user, password = _server(pg_server_dsn)
    listen = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="drjobs-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{user}" "{password}"\n')
    (workdir / "pgbouncer.ini").write_text("\n".join([
        "[databases]",
        # Any database name, on the test server: each test's own database is made on the fly.
        f"* = host='{host}' port={port}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {listen}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {workdir / 'users.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {SERVER_SESSIONS}",
        "max_client_conn = 500",
        "",
    ]))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root. Run it as the owner of the server's socket directory (the only user
        # besides root that can reach an embedded server's socket), or as nobody for a server on TCP.
        owner = pwd.getpwuid(os.stat(host).st_uid) if host.startswith("/") else pwd.getpwnam("nobody")
        as_user = ["-u", owner.pw_name]
        for path in (workdir, workdir / "users.txt", workdir / "pgbouncer.ini"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    log_path = workdir / "pgbouncer.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([PGBOUNCER, *as_user, str(workdir / "pgbouncer.ini")], stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {log_path.read_text()}") from None
                time.sleep(0.05)
        yield Bouncer("127.0.0.1", listen, user, password)
    finally:
        proc.send_signal(signal.SIGTERM)  # immediate shutdown
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def bounced_url(bouncer: Bouncer, database_url: str) -> str:
    """This test's database, through PgBouncer."""
    return bouncer.url(unquote(urlsplit(database_url).path.lstrip("/")))


@pytest.fixture
async def pooled(bounced_url: str) -> AsyncIterator[Store]:
    """A store on this test's database through PgBouncer, as `DATABASE_POOLER=transaction` opens it."""
    store = await Store.connect(bounced_url, "pooled", min_size=2, max_size=10, pooler="transaction")
    try:
        yield store
    finally:
        await store.close()


async def test_the_pooler_is_in_transaction_mode_where_named_statements_break(bounced_url: str) -> None:
    """What the setting is for: asyncpg's default statement cache (named prepared statements, one server session's
    each) fails as soon as the next transaction lands on another session."""
    async with connection(bounced_url) as cached, connection(bounced_url) as other:
        assert await cached.fetchval("SELECT $1::int + 1", 1) == 2  # prepared on the only idle session
        async with other.transaction():
            await other.fetchval("SELECT 1")  # that session is now other's, for its transaction
            with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                await cached.fetchval("SELECT $1::int + 1", 1)


async def test_pipeline_through_the_pooler_charges_each_installment_once(store: Store, pooled: Store,
                                                                        sandbox: Sandbox) -> None:
    for i in range(40):
        await due_subscription(store, months_behind=i % 3)
    assert await drain(pooled, sandbox, RECURRING_PAYMENT_BATCH_SIZE="7", CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE="9",
                       DATABASE_POOLER="transaction") == 0
    installments = sum(i % 3 + 1 for i in range(40))  # the months behind, and this month's
    await assert_charged_once(store, sandbox, records=installments, successful=installments)


async def test_two_engines_draining_through_the_pooler_charge_each_installment_once(
        bounced_url: str, store: Store, sandbox: Sandbox) -> None:
    for i in range(80):
        await due_subscription(store, months_behind=i % 2)
    # As test_payment_crashes' two drainers: slow enough that both engines work the same backlog at once.
    sandbox.configure(latency_ms=100)
    env = {"RECURRING_PAYMENTS_CONCURRENCY": "8", "DATABASE_POOLER": "transaction"}
    results = await asyncio.gather(*(run_command(
        ["drain"], sandbox_env(bounced_url, sandbox, NODE_NAME=f"bounced-{i}", **env), timeout=120)
        for i in range(2)))
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    await assert_charged_once(store, sandbox, records=120, successful=120)
    nodes = {r["node"] for r in await store.pool.fetch("SELECT node FROM payment_attempts")}
    assert nodes == {"bounced-0", "bounced-1"}


async def test_migrate_and_status_through_the_pooler(pg_server_dsn: str, bouncer: Bouncer) -> None:
    name = f"drjobs_bounced_{os.getpid()}"
    await admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    try:
        env = engine_env(bouncer.url(name), DATABASE_POOLER="transaction")
        code, _, err = await run_command(["migrate"], env)
        assert code == 0, err
        assert await fetchval(with_database(pg_server_dsn, name), "SELECT count(*) FROM schema_versions") == 1
        code, out, err = await run_command(["status", "--json"], env)
        assert code == 0, err
        assert '"jobs"' in out
    finally:
        await drop_database(pg_server_dsn, name)


async def test_a_pause_another_process_shares_arrives_without_listen(pooled: Store, sandbox: Sandbox) -> None:
    async with engine_on(pooled, sandbox) as engine:
        pauses, dr = engine.rate_pauses, engine.dr
        assert pauses is not None and dr is not None
        assert not pauses.listens and pauses.poll_seconds <= 1.0
        task = asyncio.create_task(pauses.run())
        try:
            await asyncio.sleep(0.2)
            await pooled.fetch("share_rate_pause", dr.key_id, 30.0)  # as another process's 429 writes it
            deadline = time.monotonic() + 3
            while dr.bucket.paused_until < time.monotonic() + 20:
                assert time.monotonic() < deadline, "the shared pause did not arrive within 3 s"
                await asyncio.sleep(0.05)
        finally:
            pauses.stopping.set()
            await asyncio.wait_for(task, 5)


async def test_no_session_setting_is_left_on_a_server_session(database_url: str, bouncer: Bouncer,
                                                              bounced_url: str) -> None:
    """asyncpg turns `jit` off around asking about a type; a pooled connection asks in one transaction, so every
    server session keeps the server's own `jit`."""
    default = await fetchval(database_url, "SELECT current_setting('jit')")
    store = await Store.connect(bounced_url, "pooled", min_size=SERVER_SESSIONS + 2, max_size=SERVER_SESSIONS + 2,
                                pooler="transaction")
    try:
        async def use(i: int) -> None:
            for _ in range(20):
                assert await store.pool.fetchval("SELECT cardinality($1::bigint[]) + cardinality($2::date[])",
                                                 [i], []) == 1
                await store.fetch("rate_pause_left", "no-such-key")
        await asyncio.gather(*(use(i) for i in range(SERVER_SESSIONS + 2)))
    finally:
        await store.close()
    # Every server session PgBouncer has (it opens at most SERVER_SESSIONS), each held in a transaction at once.
    async with asyncpg.create_pool(bounced_url, min_size=SERVER_SESSIONS, max_size=SERVER_SESSIONS,
                                   statement_cache_size=0, reset=lambda conn: asyncio.sleep(0)) as pool:
        seen: dict[int, str] = {}
        held = asyncio.Event()

        async def look() -> None:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow("SELECT pg_backend_pid() AS pid, current_setting('jit') AS jit")
                seen[row["pid"]] = row["jit"]
                if len(seen) == SERVER_SESSIONS:
                    held.set()
                await asyncio.wait_for(held.wait(), 10)
        await asyncio.gather(*(look() for _ in range(SERVER_SESSIONS)))
    assert set(seen.values()) == {default}, seen


async def test_pooled_connections_learn_every_type_the_statements_use(database_url: str) -> None:
    """A pooled connection learns ARRAY_TYPES in one transaction when it opens; a type a statement uses beyond
    those would be learnt outside a transaction (and could leave `jit` off on a server session)."""
    async with connection(database_url) as conn:
        await _init_connection(conn)
        warm = await conn.prepare("SELECT " + ", ".join(f"NULL::{name}" for name in ARRAY_TYPES))
        learnt = {a.type.oid for a in warm.get_attributes()}
        missing: dict[str, set[str]] = {}
        for name, text in QUERIES.items():
            statement = await conn.prepare(sql(name, sorted(LEASED_TABLES)[0]) if "{table}" in text else text)
            for t in [*statement.get_parameters(), *(a.type for a in statement.get_attributes())]:
                if (t.kind != "scalar" or t.schema != "pg_catalog") and t.oid not in learnt:
                    missing.setdefault(name, set()).add(t.name)
    assert missing == {}, f"add these to engine.store.ARRAY_TYPES: {missing}"
