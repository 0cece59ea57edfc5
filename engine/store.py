"""The PostgreSQL store: one asyncpg pool, the named queries, migrations, and the claim primitive.

Every statement lives in `engine/sql/*.sql` (one file per area) under a name; code runs them with
`store.fetch("name", …)` and friends. A condition several statements share (each job's "due" rule, used by its
claim, its drain count and /metrics) is written once as a `-- fragment:` and used as `{{name}}`.

Claiming is the same for every job (`Leases`):

- `claim(query, limit, *args)` runs a named claim statement, which selects due rows `FOR UPDATE SKIP LOCKED`,
  stamps `locked_by`/`locked_until` and returns them. It runs on its own (autocommit), so the claim is
  committed before any call to Digital River is made.
- While rows are in flight a heartbeat task extends their leases every third of `LEASE_SECONDS`. Rows whose
  lease is gone (this node stalled past it and another node took them) are reported as lost.
- A job's final write clears the lease in the same statement (`locked_by = NULL`); `done(ids)` then forgets
  them. `release(ids)` hands unfinished rows back (shutdown). A process that dies simply stops heartbeating:
  its rows become claimable when `locked_until` passes.

Claim statements follow one convention: `$1` the node name, `$2` the row limit, `$3` the lease in seconds,
further parameters after those.

Behind a pooler in transaction mode (`DATABASE_POOLER=transaction`, PgBouncer's `pool_mode = transaction`) a
connection is one server session only for the length of a transaction, so nothing may rely on a session:

- No named prepared statements (`statement_cache_size=0`): asyncpg then sends each statement as the unnamed one,
  Parse and Describe followed by a Flush, not a Sync, and Bind and Execute with the Sync, so the pooler keeps the
  whole exchange on one server session (it only hands a session back at a ReadyForQuery outside a transaction).
- No session state: the pool's reset query is skipped anyway, `_init_connection` only sets client-side codecs,
  advisory locks are transaction-level (`pg_advisory_xact_lock`; the session lock of a no-transaction migration is
  refused there, `sessions` False), `SET` is only `SET LOCAL`, and the rate-pause listener polls instead of
  LISTENing (engine/rate_pauses.py).
- asyncpg asks the server about a type it does not know the first time a connection meets it, with `jit` turned
  off for the session around the question: three statements, which outside a transaction a pooler may send to
  three sessions, leaving one with `jit` off. So a pooled connection asks about every type the statements use at
  once, in one transaction, when it opens (`_init_pooled_connection`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg

from engine.logs import get_logger
from engine.settings import DATABASE_POOLERS

log = get_logger(component="store")

SQL_DIR = Path(__file__).with_name("sql")
# engine/schema.sql: in a checkout a link to the repository's schema.sql, in a wheel a copy of it.
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"
# Tables whose rows are claimed with a lease; the only values `{table}` in the SQL files can take.
LEASED_TABLES = frozenset({"subscription_process_data", "fulfillments", "line_item_fulfillments"})


# `{{fragment}}` or `{{fragment zones=$2}}` in a statement: the named block (a condition written once, like a job's
# "due" rule) in parentheses, its `:zones` placeholders given that statement's parameter numbers.
_FRAGMENT = re.compile(r"\{\{(\w+)((?:\s+\w+=\$\d+)*)\s*\}\}")


def load_queries(paths: list[Path] | None = None) -> dict[str, str]:
    """Parse the `-- name: x` blocks of every SQL file into {name: sql}, comment lines dropped, with every
    `{{fragment}}` filled in from the `-- fragment: x` blocks (conditions, not statements: not returned)."""
    blocks: dict[str, str] = {}
    fragments: set[str] = set()
    for path in paths if paths is not None else sorted(SQL_DIR.glob("*.sql")):
        _load_file(path, blocks, fragments)
    return {name: _expand(text, blocks, fragments) for name, text in blocks.items() if name not in fragments}


def _expand(text: str, blocks: dict[str, str], fragments: set[str]) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise ValueError(f"SQL fragment {name!r} is not defined")
        fragment = blocks[name]
        for binding in match.group(2).split():
            placeholder, parameter = binding.split("=")
            fragment = re.sub(rf":{placeholder}\b", parameter, fragment)
        return f"({fragment})"
    return _FRAGMENT.sub(fill, text)


def _load_file(path: Path, blocks: dict[str, str], fragments: set[str]) -> None:
    name: str | None = None
    lines: list[str] = []
    for line in path.read_text().splitlines():
        match = re.match(r"--\s*(name|fragment):\s*(\S+)\s*$", line)
        if match:
            if name:
                blocks[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = match.group(2), []
            if name in blocks:
                raise ValueError(f"query {name!r} is defined twice (again in {path.name})")
            if match.group(1) == "fragment":
                fragments.add(name)
        elif name and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        blocks[name] = "\n".join(lines).strip().rstrip(";")


QUERIES = load_queries()


def sql(name: str, table: str | None = None) -> str:
    """The statement called `name`, with `{table}` filled for the lease statements."""
    text = QUERIES[name]
    if "{table}" in text:
        if table not in LEASED_TABLES:
            raise ValueError(f"{table!r} is not a leased table")
        text = text.replace("{table}", table)
    return text


# The array types the statements take or return, which asyncpg does not know without asking the server (it knows
# text[] and oid[]). tests/integration/test_pgbouncer.py checks that every statement's types are among these.
ARRAY_TYPES = ("bigint[]", "integer[]", "text[]", "jsonb[]", "date[]", "timestamptz[]")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as text: callers pass json.dumps output and json.loads what they read, once. A client-side
    # codec of a built-in type: no statement is sent, nothing is set on the server.
    await conn.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog", format="text")


async def _init_pooled_connection(conn: asyncpg.Connection) -> None:
    """`_init_connection` for a connection through a transaction pooler: also learns every array type now, in one
    transaction (one server session), so asyncpg's `jit` off-and-on around the question stays in that session."""
    await _init_connection(conn)
    async with conn.transaction():
        await conn.fetchrow("SELECT " + ", ".join(f"NULL::{name}" for name in ARRAY_TYPES))


class Store:
    """The pool and the named queries. One per process."""

    def __init__(self, pool: asyncpg.Pool, node: str, pooler: str = "none") -> None:
        self.pool = pool
        self.node = node
        self.pooler = pooler

    @property
    def sessions(self) -> bool:
        """Whether a connection is one server session for its whole life (no transaction pooler in between), so
        session features such as LISTEN work."""
        return self.pooler == "none"

    @classmethod
    async def connect(cls, dsn: str, node: str, *, min_size: int = 2, max_size: int = 10,
                      pooler: str = "none") -> Store:
        if pooler not in DATABASE_POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}")
        pooled = pooler == "transaction"
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size,
            init=_init_pooled_connection if pooled else _init_connection,
            # The engine never leaves session state behind, so skip the reset query on every release
            # (docs/performance.md: 19–29% faster single-row pipelines). Through a pooler it would also reset
            # whichever session the pooler picked, not this connection's.
            reset=lambda conn: asyncio.sleep(0),
            # Named prepared statements live in one server session: through a transaction pooler the next use of
            # one may land in another ("prepared statement __asyncpg_stmt_1__ does not exist"). 0: unnamed only.
            **({"statement_cache_size": 0} if pooled else {}),
            server_settings={"application_name": f"drjobs:{node}"[:63]},
            command_timeout=120,
        )
        return cls(pool, node, pooler)

    async def close(self) -> None:
        await self.pool.close()

    async def fetch(self, name: str, *args: Any, table: str | None = None) -> list[asyncpg.Record]:
        return await self.pool.fetch(sql(name, table), *args)  # type: ignore[no-any-return]

    async def fetchrow(self, name: str, *args: Any, table: str | None = None) -> asyncpg.Record | None:
        return await self.pool.fetchrow(sql(name, table), *args)

    async def fetchval(self, name: str, *args: Any, table: str | None = None) -> Any:
        return await self.pool.fetchval(sql(name, table), *args)

    async def execute(self, name: str, *args: Any, table: str | None = None) -> str:
        return await self.pool.execute(sql(name, table), *args)  # type: ignore[no-any-return]

    async def ping(self) -> bool:
        """True when the database answers a trivial query within 5 seconds."""
        try:
            return bool(await self.pool.fetchval(sql("health_ping"), timeout=5))
        except Exception as exc:
            if is_outage(exc):
                return False
            raise

    async def migrate(self, *, schema_path: Path | None = None, migrations_dir: Path | None = None) -> bool:
        """Bring the database to the current schema: the numbered migrations it has not had (engine/migrations/),
        then schema.sql unless this exact version is applied already; an empty database gets schema.sql with every
        migration recorded. True if anything was applied now. engine/schema.py says how.

        Safe to run again and concurrently from several processes: an advisory lock serialises every step, and
        what is recorded (`schema_migrations`, `schema_versions`) is not applied again, so engines starting beside
        running ones take no table locks (re-creating triggers under load would deadlock with them). Raises
        engine.schema.MigrationError, one line, when the database cannot be migrated as it stands (an applied
        migration's file changed, a newer release migrated it).
        """
        from engine.schema import migrate

        return await migrate(self.pool, schema_path or SCHEMA_PATH, migrations_dir, sessions=self.sessions)


# Errors that say the database cannot be reached or is restarting (a crash, a failover, a network cut), not that
# a statement was wrong: connection exceptions (SQLSTATE class 08), shutdown and start-up (57P01-57P03), too many
# connections (53300), a read-only server (25006, a failover half done), and the client's own socket errors and
# timeouts. Work that meets one waits for the database and carries on; it is never counted as a crash.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError,
    asyncpg.ReadOnlySQLTransactionError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) means the database is unreachable rather than a statement failing.
    Only explicit causes are followed: an error merely raised while another was being handled is its own."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OUTAGE_ERRORS):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection" in str(current).lower() \
                and "closed" in str(current).lower():
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


class LeaseLost(Exception):
    """This node no longer holds the lease of a row it was working on: it must stop without writing. `fields`
    go into the record's log line (the Digital River order it holds, say)."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.fields = fields


class Leases:
    """Claims rows of one leased table for this node and keeps their leases alive while in flight.

    Fencing (docs/reliability.md): each claim stamps a fresh `lease_token` on its rows, kept here with the id.
    Every write a job makes under the lease names the token, so a worker that outlived its lease (stalled,
    paused, cut off from the database) while another claim took the row changes nothing. The heartbeat never
    revives a lease that already ran out and never waits on a row another session has locked; a lease it finds
    gone is logged (`lease_lost`), counted, and raised by `check` before the worker's next call or write. A row
    still in flight here is never claimed again by this node, even after its lease ran out under it.
    """

    def __init__(self, store: Store, table: str, lease_seconds: int,
                 on_lost: Callable[[str, int], None] | None = None) -> None:
        if table not in LEASED_TABLES:
            raise ValueError(f"{table!r} is not a leased table")
        self.store = store
        self.table = table
        self.lease_seconds = lease_seconds
        self.on_lost = on_lost
        # In flight on this node: id → the token of the claim that leased it.
        self.in_flight: dict[int, int] = {}
        self.lost: set[int] = set()

    async def claim(self, query: str, limit: int, *args: Any) -> list[asyncpg.Record]:
        """Claim up to `limit` due rows with the named claim statement; the claim is committed on return.

        Claim statements take `$1` node, `$2` limit, `$3` lease seconds, `$4` the ids this node has in flight
        (never claimed again), then `args`; they return `id` and `lease_token` of each row.
        """
        if limit <= 0:
            return []
        rows = await self.store.fetch(query, self.store.node, limit, float(self.lease_seconds),
                                      list(self.in_flight), *args)
        for row in rows:
            self.in_flight[row["id"]] = row["lease_token"]
            self.lost.discard(row["id"])
        return rows

    def token(self, row_id: int) -> int:
        """The lease token this node holds for an in-flight row (what its writes must name)."""
        return self.in_flight[row_id]

    def done(self, ids: Iterable[int]) -> None:
        """Forget rows whose final write has cleared their lease (or that this node gave up)."""
        for row_id in ids:
            self.in_flight.pop(row_id, None)
            self.lost.discard(row_id)

    async def release(self, ids: Iterable[int] | None = None) -> None:
        """Hand rows back unfinished (all in-flight rows when `ids` is None), only where the lease is still ours."""
        chosen = [i for i in (list(self.in_flight) if ids is None else ids) if i in self.in_flight]
        if not chosen:
            return
        await self.store.execute("release_leases", chosen, [self.in_flight[i] for i in chosen], table=self.table)
        self.done(chosen)

    async def touch(self, row_id: int) -> None:
        """Fence before a call that moves money or goods: raise LeaseLost unless this node's lease on the row is
        still current and unexpired; it is pushed out by a full lease for the call."""
        self.check(row_id)
        kept = await self.store.fetchval("touch_lease", row_id, self.in_flight[row_id], float(self.lease_seconds),
                                         table=self.table)
        if kept is None:
            self._mark_lost({row_id})
            raise LeaseLost(f"{self.table} row {row_id} is no longer leased to {self.store.node}")

    async def extend(self) -> None:
        """One heartbeat: extend every in-flight lease still held, and note the ones this node lost."""
        ids = sorted(i for i in self.in_flight if i not in self.lost)
        if not ids:
            return
        tokens = [self.in_flight[i] for i in ids]
        kept = {r["id"] for r in await self.store.fetch(
            "extend_leases", self.store.node, ids, tokens, float(self.lease_seconds), table=self.table)}
        missed = [(i, t) for i, t in zip(ids, tokens, strict=True) if i not in kept]
        if not missed:
            return
        # Not renewed: either locked by another session right now (still ours: looked at again next beat), or gone.
        held = {r["id"] for r in await self.store.fetch(
            "lease_states", [i for i, _ in missed], [t for _, t in missed], table=self.table) if r["held"]}
        # Rows finished while the heartbeat ran are not lost; only rows still in flight under the same claim are.
        lost = {i for i, t in missed if i not in held and self.in_flight.get(i) == t}
        if held:
            log.warning("lease_not_renewed_row_locked", table=self.table, ids=sorted(held)[:20], count=len(held))
        self._mark_lost(lost)

    def _mark_lost(self, lost: set[int]) -> None:
        lost = lost - self.lost
        if not lost:
            return
        self.lost.update(lost)
        log.warning("lease_lost", table=self.table, ids=sorted(lost)[:20], count=len(lost))
        if self.on_lost is not None:
            self.on_lost(self.table, len(lost))

    def check(self, row_id: int) -> None:
        """Raise LeaseLost if this node's lease on the row was found gone (checked before every call and write)."""
        if row_id in self.lost or row_id not in self.in_flight:
            raise LeaseLost(f"{self.table} row {row_id} is no longer leased to {self.store.node}")

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Extend leases every third of the lease until `stop` is set."""
        interval = max(1.0, self.lease_seconds / 3)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
            if self.in_flight:
                try:
                    # A beat that cannot finish within a third of the lease is abandoned and tried again: the
                    # leases then lapse on their own and the workers find out before their next write.
                    await asyncio.wait_for(self.extend(), timeout=interval)
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("lease_heartbeat_failed", table=self.table, error=str(exc) or type(exc).__name__)
