"""Schema upgrades: schema.sql, the whole current schema, and the numbered migrations in engine/migrations/.

`migrate` (`Store.migrate`: `python run.py migrate`, and every command that opens the store to write) brings a
database to the current schema, and is safe to run again and again, and from several processes at once:

- An empty database gets schema.sql, and every migration is recorded as applied without being run: schema.sql
  already is what they all lead to.
- Any other database first gets the migrations it has not had, in order, each once, then schema.sql if this
  version of the file (its sha256, in `schema_versions`) was not applied yet. A database of release 0.1.0, from
  before migrations (no `schema_migrations` table), has had none, so it gets them all.
- A migration runs in a transaction of its own together with its row in `schema_migrations`, unless its first line
  is `-- drjobs: no-transaction` (for `CREATE INDEX CONCURRENTLY`): then its statements run one at a time outside
  any transaction, and it is recorded after the last one. A failure there leaves the statements before it done and
  the migration unrecorded, so such a file must be safe to run again from its start.
- Nothing is applied when a recorded migration's file has changed (its sha256), when the database has a migration
  this release does not have (a newer release migrated it), or when one is missing below an applied one: a
  MigrationError says which, in one line, and what to do.

Every step takes the advisory lock 7261001, the one release 0.1.0's `migrate` takes, and looks again at what is
applied before it does anything, so each step happens once and in order whoever runs it. A transactional step holds
the lock for its transaction, which works through a transaction pooler too; a no-transaction migration holds it
for the session while its statements run, so it needs a direct connection to PostgreSQL. A process that finds the
lock taken tries again a little later instead of waiting inside a statement (`_Waiter` says why).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from engine.logs import get_logger
from engine.store import is_outage, sql

log = get_logger(component="schema")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# How long one migration statement, or the wait for another process's migration, may take on the client's side
# (the pool's own command timeout, 120 s, would cut a concurrent index build or a backfill of a large table short).
MIGRATION_TIMEOUT = 24 * 3600.0
NO_TRANSACTION_MARK = "-- drjobs: no-transaction"
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9]+(?:_[a-z0-9]+)*)\.sql")
_NO_TRANSACTION = re.compile(r"--\s*drjobs:\s*no-transaction")


class MigrationError(Exception):
    """The database is not migrated as it stands; `str()` is one line saying why and what to do."""


@dataclass(frozen=True)
class Migration:
    """One file of engine/migrations/: `NNNN_name.sql`."""

    version: int
    name: str
    file: str
    text: str
    checksum: str  # sha256 of the file's bytes
    transactional: bool  # False when the first line is `-- drjobs: no-transaction`


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration in `directory`, in order; they must be numbered 0001, 0002, … with no gap or repeat."""
    if not directory.is_dir():
        raise MigrationError(f"the migrations directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path.name} in {directory} is not named NNNN_short_name.sql (four digits, then "
                                 "lower-case words joined by _)")
        data = path.read_bytes()
        text = data.decode()
        first_line = text.split("\n", 1)[0].strip()
        found.append(Migration(int(match.group(1)), match.group(2), path.name, text, hashlib.sha256(data).hexdigest(),
                               _NO_TRANSACTION.fullmatch(first_line) is None))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            previous = found[expected - 2].file if expected > 1 else None
            if previous and found[expected - 2].version == migration.version:
                raise MigrationError(f"two migrations in {directory} have the number {migration.version:04d}: "
                                     f"{previous} and {migration.file}; give the later one the next free number")
            raise MigrationError(f"migrations in {directory} must be numbered 0001, 0002, … without a gap: "
                                 f"{migration.file} comes where {expected:04d} should be")
    return found


def pending_migrations(migrations: Sequence[Migration], applied: Sequence[Any]) -> list[Migration]:
    """The migrations not yet applied, in order, given the `schema_migrations` rows (version, name, checksum).
    MigrationError when an applied one changed, when the database has one this release does not, or a gap."""
    known = {m.version: m for m in migrations}
    last = migrations[-1].file if migrations else "none"
    for row in applied:
        recorded = f"{row['version']:04d}_{row['name']}"
        migration = known.get(row["version"])
        if migration is None:
            raise MigrationError(
                f"this database has migration {recorded}, which this release does not have (its last is {last}): a "
                "newer release migrated it. Run that release or a later one; an older one must not run against it")
        if migration.name != row["name"] or migration.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {migration.file} was changed after it was applied to this database (recorded as "
                f"{recorded}, sha256 {row['checksum'][:12]}…; the file now has {migration.checksum[:12]}…): an "
                "applied migration must never change. Restore the file as it was and put the change in a new "
                "migration")
    done = {row["version"] for row in applied}
    pending = [m for m in migrations if m.version not in done]
    if pending and done and pending[0].version < max(done):
        raise MigrationError(
            f"migration {pending[0].file} is not applied to this database but the later {max(done):04d} is: a "
            "migration was added below one already applied somewhere. Give it the next free number instead")
    return pending


def split_statements(text: str) -> list[str]:
    """The statements of a script, for running them one at a time (PostgreSQL runs several statements sent at once
    as one transaction, where CREATE INDEX CONCURRENTLY is refused). Knows `--` and `/* */` comments, quoted
    strings and identifiers, E'' strings and dollar quoting; a part holding only comments is dropped."""
    statements: list[str] = []
    start = i = 0
    code = False
    n = len(text)
    while i < n:
        char = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        if char == ";":
            if code:
                statements.append(text[start:i].strip())
            start, i, code = i + 1, i + 1, False
            continue
        if not char.isspace():
            code = True
        if char in "'\"":
            backslashes = char == "'" and i > 0 and text[i - 1] in "eE" and not _identifier_char(text, i - 2)
            i += 1
            while i < n:
                if backslashes and text[i] == "\\":
                    i += 2
                elif text[i] == char:
                    if text.startswith(char * 2, i):
                        i += 2
                    else:
                        break
                else:
                    i += 1
            i += 1
            continue
        if char == "$" and not _identifier_char(text, i - 1):
            tag = re.match(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if tag:
                end = text.find(tag.group(0), i + len(tag.group(0)))
                i = n if end < 0 else end + len(tag.group(0))
                continue
        i += 1
    if code:
        statements.append(text[start:].strip())
    return statements


def _identifier_char(text: str, i: int) -> bool:
    return i >= 0 and (text[i].isalnum() or text[i] in "_$")


@contextmanager
def _failure_of(what: str, transactional: bool) -> Iterator[None]:
    """A statement of `what` (a migration's file, or schema.sql) refused by PostgreSQL becomes one MigrationError
    line saying what was kept; a database that went away stays what it is (an outage)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if is_outage(exc):
            raise
        error = " ".join(str(exc).split())[:300]
        if isinstance(exc, asyncpg.ActiveSQLTransactionError):
            advice = f"it must run outside a transaction: make `{NO_TRANSACTION_MARK}` its first line"
        elif transactional:
            advice = "nothing of it was kept; fix it and run migrate again"
        else:
            advice = ("the statements before the failing one stay done, so it must be safe to run again from its "
                      "start (IF NOT EXISTS; DROP INDEX CONCURRENTLY IF EXISTS for an index a failed build left "
                      "invalid); fix it and run migrate again")
        raise MigrationError(f"{what} failed: {type(exc).__name__}: {error}; {advice}") from exc


async def migrate(pool: asyncpg.Pool, schema_path: Path, migrations_dir: Path | None = None, *,
                  sessions: bool = True) -> bool:
    """Bring the database of `pool` to the current schema (this module's docstring); True if anything was applied.
    `sessions` False (a transaction pooler between us and PostgreSQL): a no-transaction migration is refused."""
    migrations, schema = _read(schema_path, migrations_dir or MIGRATIONS_DIR)
    digest = hashlib.sha256(schema.encode()).hexdigest()
    changed = False
    waiter = _Waiter()
    async with pool.acquire() as conn:
        while True:
            started = time.monotonic()
            async with conn.transaction():
                step = await _next_step(conn, migrations, digest) if await conn.fetchval(sql("migrate_try_lock")) \
                    else "wait"
                if step is None:
                    return changed
                if step != "wait":
                    await conn.execute("SET LOCAL client_min_messages = warning")
                if step == "fresh":
                    with _failure_of(schema_path.name, transactional=True):
                        await conn.execute(schema, timeout=MIGRATION_TIMEOUT)
                    await conn.execute(sql("record_schema_version"), digest)
                    await conn.executemany(sql("record_migration"),
                                           [(m.version, m.name, m.checksum) for m in migrations])
                elif step == "schema":
                    with _failure_of(schema_path.name, transactional=True):
                        await conn.execute(schema, timeout=MIGRATION_TIMEOUT)
                    await conn.execute(sql("record_schema_version"), digest)
                elif isinstance(step, Migration) and step.transactional:
                    # Only comments (the baseline): nothing to send (asyncpg fails on an empty query's answer).
                    with _failure_of(f"migration {step.file}", transactional=True):
                        if split_statements(step.text):
                            await conn.execute(step.text, timeout=MIGRATION_TIMEOUT)
                    await conn.execute(sql("record_migration"), step.version, step.name, step.checksum)
            if step == "wait":
                await waiter.wait()
                continue
            seconds = round(time.monotonic() - started, 3)
            if step == "fresh":
                log.info("schema_applied", version=digest[:12], fresh=True, migrations_recorded=len(migrations),
                         seconds=seconds)
            elif step == "schema":
                log.info("schema_applied", version=digest[:12], seconds=seconds)
            elif isinstance(step, Migration):
                if not step.transactional:
                    if not sessions:
                        raise MigrationError(
                            f"migration {step.file} runs outside a transaction, which needs a session of its own: "
                            "run `python run.py migrate` once on a direct connection to PostgreSQL (DATABASE_URL of "
                            "the server itself, DATABASE_POOLER=none), not through the transaction pooler")
                    if not await _apply_outside_transaction(conn, step, migrations, waiter):
                        continue  # another process applied it meanwhile
                    seconds = round(time.monotonic() - started, 3)
                log.info("migration_applied", version=step.version, name=step.name,
                         transaction=step.transactional, seconds=seconds)
            changed = True


class _Waiter:
    """Waits, between attempts at the migration lock, for another process's migration step. The wait happens outside
    any statement: a session waiting for a lock inside one (`pg_advisory_lock`) is a running transaction, which a
    concurrent index build of the process holding the lock waits for in turn, a deadlock PostgreSQL ends by failing
    one of them."""

    FIRST, LONGEST = 0.05, 1.0

    def __init__(self) -> None:
        self.delay = 0.0
        self.said = False

    async def wait(self) -> None:
        if not self.said:
            self.said = True
            log.info("migrate_waiting", detail="another process is migrating this database; waiting for it to finish")
        self.delay = min(self.LONGEST, max(self.FIRST, self.delay * 1.5))
        await asyncio.sleep(self.delay)


def _read(schema_path: Path, migrations_dir: Path) -> tuple[list[Migration], str]:
    """The migrations and schema.sql's text, read (and the migrations checked) before anything is asked of the
    database."""
    return load_migrations(migrations_dir), schema_path.read_text()


async def _next_step(conn: asyncpg.Connection, migrations: Sequence[Migration], digest: str) -> Migration | str | None:
    """Under the lock: "fresh" (an empty database), the next migration, "schema" (schema.sql not applied in this
    version), or None (nothing to do). Takes no table lock."""
    state = await conn.fetchrow(sql("schema_state"))
    if not state["migrations"]:
        if not state["populated"]:
            return "fresh"
        # A database of a release before migrations: none applied yet (the table is made with the first step).
        await conn.execute(sql("create_schema_migrations"))
    pending = pending_migrations(migrations, await conn.fetch(sql("applied_migrations")))
    if pending:
        return pending[0]
    if not state["versions"] or not await conn.fetchval(sql("schema_version_applied"), digest):
        return "schema"
    return None


async def _apply_outside_transaction(conn: asyncpg.Connection, migration: Migration,
                                     migrations: Sequence[Migration], waiter: _Waiter) -> bool:
    """Run a no-transaction migration's statements one at a time under the session lock, then record it; False if
    it is no longer the next one to apply (another process applied it meanwhile)."""
    try:
        while not await conn.fetchval(sql("migrate_try_session_lock")):
            await waiter.wait()
    except BaseException:
        # Cut short, the last try may have been granted the lock as it was cancelled: end the session, and any lock
        # with it.
        conn.terminate()
        raise
    try:
        pending = pending_migrations(migrations, await conn.fetch(sql("applied_migrations")))
        if not pending or pending[0].version != migration.version:
            return False
        with _failure_of(f"migration {migration.file}", transactional=False):
            for statement in split_statements(migration.text):
                await conn.execute(statement, timeout=MIGRATION_TIMEOUT)
        # `CREATE INDEX CONCURRENTLY IF NOT EXISTS` passes over an index an earlier failed build left invalid.
        invalid = [r["name"] for r in await conn.fetch(sql("invalid_indexes")) if r["name"] in migration.text]
        if invalid:
            raise MigrationError(
                f"migration {migration.file} left invalid indexes {', '.join(invalid)} (a concurrent build failed, "
                "now or before): drop them (DROP INDEX CONCURRENTLY) and run migrate again, or have the migration "
                "drop them first")
        await conn.execute(sql("record_migration"), migration.version, migration.name, migration.checksum)
        return True
    finally:
        try:
            await conn.execute(sql("migrate_session_unlock"))
        except BaseException as exc:
            # Ending the session gives the lock back.
            conn.terminate()
            if not isinstance(exc, Exception):
                raise
