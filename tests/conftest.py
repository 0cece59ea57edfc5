"""Test fixtures: a real PostgreSQL, a template database migrated once, a fresh clone per test, and a cluster of a
test's own for the tests that crash it.

The server is `TEST_DATABASE_URL` when set (any database on it; the tests create their own next to it), or
else an embedded PostgreSQL started for the session under a temporary directory. The helpers these fixtures use,
and that tests share, are in tests/db.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from engine.store import Store
from tests.db import admin, create_database, drop_database, embedded_cluster, open_store, with_database


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_cluster("drjobs-pg-") as server:
        yield server.get_uri()


@pytest.fixture(scope="session")
def template_database(pg_server_dsn: str) -> Iterator[str]:
    """A database with schema.sql applied, cloned by every test."""
    name = f"drjobs_template_{os.getpid()}"
    asyncio.run(create_database(pg_server_dsn, name, replace=True))
    try:
        yield name
    finally:
        asyncio.run(drop_database(pg_server_dsn, name))


@pytest.fixture
async def database_url(pg_server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    name = f"drjobs_test_{uuid.uuid4().hex[:12]}"
    await admin(pg_server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        await drop_database(pg_server_dsn, name)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with open_store(database_url, "test-node") as s:
        yield s


@pytest.fixture
def private_server() -> Iterator[Any]:
    """A PostgreSQL cluster this test owns, so it can crash it (tests.db.crash) and start it again
    (tests.db.restart). Its admin database's dsn is `get_uri("postgres")`."""
    with embedded_cluster("drjobs-crash-") as server:
        yield server
