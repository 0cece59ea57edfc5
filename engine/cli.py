"""The command line: `drjobs COMMAND` (the installed console script) and `python run.py COMMAND` are the same.

Reads the command and the settings first; anything wrong is one line on stderr and exit 2, before anything is
started or written. `COMMAND --help` describes the command, its options and the settings it reads. Then sets up
logging and hands over to the engine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from engine.settings import JOBS, Settings, SettingsError, load

COMMANDS = ("serve", "migrate", "run", "drain", "status", "forecast", "pause", "resume", "retry", "demo", "sandbox")


class UsageError(Exception):
    pass


class HelpRequested(Exception):
    """`--help`: the text to print on stdout, exit 0."""


# Settings each command reads, by group (README's settings table says what each means).
_DATABASE = "DATABASE_URL (or DATA_DIR for the embedded one), DATABASE_POOL_SIZE, DATABASE_POOLER"
_LOGS = "LOG_LEVEL, LOG_FORMAT"
_DIGITAL_RIVER = ("DR_API_KEY (required), DR_API_URL, DR_API_VERSION, DR_TIMEOUT_SECONDS, "
                  "DR_MAX_REQUESTS_PER_SECOND")
_JOBS = ("CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT, CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE, "
         "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT, RECURRING_PAYMENT_BATCH_SIZE, SUBSCRIPTION_RETRY_COUNT, "
         "FULFILLMENT_QUERY_LIMIT, FULFILLMENT_RETRY_LIMIT, <JOB>_CONCURRENCY, LEASE_SECONDS, APP_LOG_LEVEL, "
         "APP_LOG_RETENTION_DAYS, NODE_NAME, NODE_LOST_SECONDS")
_SERVE = ("<JOB>_SCHEDULE, SCHEDULE_TIME_ZONE, SHUTDOWN_GRACE_SECONDS, HTTP_HOST, HTTP_PORT, ADMIN_TOKEN, "
          "DR_WEBHOOK_SECRET, WEBHOOK_HOST, WEBHOOK_PORT, WEBHOOK_TOLERANCE_SECONDS")

# name → (arguments, what it does, options, settings read).
HELP: dict[str, tuple[str, str, list[tuple[str, str]], list[str]]] = {
    "serve": ("", "Apply the schema if needed, then run every job on its schedule until SIGTERM/SIGINT, then stop "
              "gracefully (in-flight work gets SHUTDOWN_GRACE_SECONDS). The default command. Refuses to start "
              "while a variable looks like a misspelt setting.", [], [_DATABASE, _DIGITAL_RIVER, _JOBS, _SERVE, _LOGS]),
    "migrate": ("", "Bring the database's schema up to date. Safe to run again and again, and from several "
                "processes at once.", [], [_DATABASE, _LOGS]),
    "run": ("JOB", "One run of JOB now, on this process; returns when that run has finished. Exit 0 if the run "
            "finished (even when some records failed), 1 if the run itself crashed.", [],
            [_DATABASE, _DIGITAL_RIVER, _JOBS, _LOGS]),
    "drain": ("", "Run the jobs again and again until no record is due anywhere (records waiting for a later "
              "attempt are not due), then return.", [], [_DATABASE, _DIGITAL_RIVER, _JOBS, _LOGS]),
    "status": ("[--json]", "Jobs with the schedules the live engines report, next fire times, last runs, records "
               "by status, why records failed, and the engine processes. Only reads: never creates or changes "
               "anything.", [("--json", "the same as JSON, for machines")], [_DATABASE, "NODE_LOST_SECONDS"]),
    "forecast": ("[--days N] [--json]",
                 "The charges the schedules will make over the next N days, day 0 being today (UTC): per day and "
                 "currency, the number of installments and their amount before tax (quantity × unit price), then "
                 "totals per currency. Counts the Open installment records still to charge (on their next attempt's "
                 "day) and the installments the subscription-installments job will make (same dates and time zones "
                 "as the job); whatever is already due, overdue installments included, is on day 0. Pending "
                 "installments (payment being confirmed by Digital River) are not counted; the notes say what else "
                 "is left out. Only reads: never creates or changes anything.",
                 [("--days N", "how many days, day 0 included (default 30, 1 to 366)"),
                  ("--json", "the same as JSON, for machines")], [_DATABASE]),
    "pause": ("JOB", "No engine process claims JOB's records until `resume JOB` (runs in flight finish). Audited "
              "in application_logs.", [], [_DATABASE, "NODE_NAME"]),
    "resume": ("JOB", "Undo `pause JOB`.", [], [_DATABASE, "NODE_NAME"]),
    "retry": ("KIND ID", "Put a Failed record back to Open, due now. KIND is installment, fulfillment or "
              "line-item; ID the record's id. Audited in application_logs.", [], [_DATABASE, "NODE_NAME"]),
    "demo": ("[--subscriptions N] [--latency-ms MS] [--storefronts N] [--keep] [--console]",
             "A newcomer's first run: an embedded PostgreSQL and the local Digital River sandbox, a seeded book, "
             "every job to completion with progress bars, then a summary. The engine's own log goes to a file "
             "the summary names. On a terminal it then serves the web console (read-only) on the demo's database "
             "at a free loopback port and waits for Ctrl-C. With --storefronts 2 or more the book is spread over "
             "DefaultStore, EU Store, …, each charged with its own key at its own sandbox, and the summary shows "
             "each storefront's share and what its sandbox saw.",
             [("--subscriptions N", "subscriptions in the seeded book (default 2000, 1 to 200000)"),
              ("--latency-ms MS", "the sandbox's answer time (default 0)"),
              ("--storefronts N", "storefronts, each with its own key and sandbox (default 1, 1 to 8)"),
              ("--keep", "keep the demo's database afterwards; the summary prints the command to look at it"),
              ("--console", "serve the web console after the summary even when stdout is not a terminal")],
             ["DATA_DIR (the demo's embedded database lives under DATA_DIR/demo)", _LOGS]),
    "sandbox": ("[--port N] [--latency-ms MS] [...]", "Serve the local Digital River sandbox alone, for pointing "
                "DR_API_URL at. `sandbox --help` lists its options.", [], []),
}


# One line per command for `--help`.
SUMMARY = {
    "serve": "run every job on its schedule until stopped (the default)",
    "migrate": "bring the database's schema up to date",
    "run": "one run of JOB now",
    "drain": "run the jobs until nothing is due",
    "status": "jobs, schedules, last runs, records, failures, processes (read-only)",
    "forecast": "the charges to come, per day and currency (read-only)",
    "pause": "stop claiming JOB's records until resumed",
    "resume": "undo pause",
    "retry": "a Failed record back to Open",
    "demo": "a first run on an embedded database and the local sandbox",
    "sandbox": "the local Digital River sandbox alone",
}


def prog() -> str:
    """How the user called us: `drjobs` (the console script) or `run.py`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "drjobs"
    return "run.py" if name in ("run.py", "-c", "") else name


def overview() -> str:
    lines = [f"usage: {prog()} [COMMAND] [ARGS]   (serve when no command is given)", "", "commands:"]
    for name in COMMANDS:
        args = HELP[name][0] if name in ("run", "pause", "resume", "retry", "status") else ""
        args = "[--days N]" if name == "forecast" else args
        lines.append(f"  {(name + ' ' + args).strip():<19} {SUMMARY[name]}")
    lines += ["", f"JOB is one of: {', '.join(JOBS)}.",
              f"`{prog()} COMMAND --help` describes a command, its options and the settings it reads.",
              "Settings are environment variables; a bad one is one line on stderr and exit 2."]
    return "\n".join(lines)


def command_help(name: str) -> str:
    args, what, options, settings = HELP[name]
    lines = [f"usage: {prog()} {name} {args}".rstrip(), "", *textwrap.wrap(what, 100)]
    if name in ("run", "pause", "resume"):
        lines += ["", f"JOB: {', '.join(JOBS)}"]
    if options:
        lines += ["", "options:"] + [f"  {flag:<20} {text}" for flag, text in options]
    if settings:
        lines += ["", "settings read (environment variables; README's settings table):"]
        lines += [line for group in settings for line in textwrap.wrap(group, 100, initial_indent="  ",
                                                                         subsequent_indent="    ")]
    return "\n".join(lines)


@dataclass
class Command:
    name: str
    job: str | None = None
    json: bool = False
    kind: str | None = None
    record_id: int | None = None
    days: int = 30
    options: list[str] = field(default_factory=list)


def parse(argv: Sequence[str]) -> Command:
    """The command line → a Command; UsageError names what is wrong and what is allowed, HelpRequested carries
    the help asked for."""
    args = list(argv)
    if not args:
        return Command("serve")
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        if rest and rest[0] in COMMANDS:
            raise HelpRequested(command_help(rest[0]))
        raise HelpRequested(overview())
    if name not in COMMANDS:
        raise UsageError(f"unknown command {name!r}; expected one of: {', '.join(COMMANDS)}")
    if name != "sandbox" and ("--help" in rest or "-h" in rest):
        raise HelpRequested(command_help(name))
    if name in ("run", "pause", "resume"):
        if len(rest) != 1:
            raise UsageError(f"{name} takes exactly one JOB, one of: {', '.join(JOBS)}")
        if rest[0] not in JOBS:
            raise UsageError(f"unknown job {rest[0]!r}; expected one of: {', '.join(JOBS)}")
        return Command(name, job=rest[0])
    if name == "retry":
        from engine.controls import RETRY_KINDS

        if len(rest) != 2:
            raise UsageError(f"retry takes KIND and ID: KIND one of {', '.join(RETRY_KINDS)}, ID a record id")
        if rest[0] not in RETRY_KINDS:
            raise UsageError(f"unknown record kind {rest[0]!r}; expected one of: {', '.join(RETRY_KINDS)}")
        if not rest[1].isdigit() or not 0 < int(rest[1]) < 2**63:
            raise UsageError(f"record id {rest[1]!r} is not a positive whole number")
        return Command(name, kind=rest[0], record_id=int(rest[1]))
    if name == "status":
        if rest not in ([], ["--json"]):
            raise UsageError(f"status takes only --json, not {' '.join(rest)!r}")
        return Command(name, json=bool(rest))
    if name == "forecast":
        return _parse_forecast(rest)
    if name in ("demo", "sandbox"):
        return Command(name, options=rest)
    if rest:
        raise UsageError(f"{name} takes no arguments, not {' '.join(rest)!r}")
    return Command(name)


def _parse_forecast(rest: list[str]) -> Command:
    """`forecast [--days N] [--json]`, in any order, each at most once."""
    from engine.forecast import DEFAULT_DAYS, MAX_DAYS

    command = Command("forecast", days=DEFAULT_DAYS)
    seen: set[str] = set()
    allowed = f"a whole number of days from 1 to {MAX_DAYS}"
    args = iter(rest)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag not in ("--days", "--json") or (flag == "--json" and value):
            raise UsageError(f"forecast takes only --days N and --json, not {arg!r}")
        if flag in seen:
            raise UsageError(f"forecast takes {flag} once")
        seen.add(flag)
        if flag == "--json":
            command.json = True
            continue
        if not value:
            value = next(args, "")
            if not value:
                raise UsageError(f"forecast --days needs a value: {allowed} (default {DEFAULT_DAYS})")
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_DAYS:
            raise UsageError(f"--days {value!r} is not {allowed}")
        command.days = int(value)
    return command


async def _main(command: Command, settings: Settings) -> int:
    from actors import JOB_CLASSES, build_jobs
    from engine import status
    from engine.app import Engine, opened_store

    if command.name == "migrate":
        async with opened_store(settings) as store:
            return 0
    if command.name in ("pause", "resume", "retry"):
        from engine import controls

        async with opened_store(settings) as store:
            if command.name == "retry":
                assert command.kind is not None and command.record_id is not None
                outcome = await controls.retry(store, command.kind, command.record_id)
            else:
                assert command.job is not None
                outcome = await controls.set_paused(store, command.job, command.name == "pause")
            print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
            return 0 if outcome.ok else 1
    if command.name == "status":
        async with opened_store(settings, read_only=True) as store:
            data = await status.collect(settings, store, set(JOB_CLASSES))
            print(status.render_json(data) if command.json else status.render_text(data))
            return 0
    if command.name == "forecast":
        from engine import forecast

        async with opened_store(settings, read_only=True) as store:
            data = await forecast.collect(store, command.days)
            print(forecast.render_json(data) if command.json else forecast.render_text(data))
            return 0
    if command.name == "demo":
        from engine.demo import demo

        return await demo(command.options, build_jobs)
    if command.name == "run" and command.job not in JOB_CLASSES:
        print(f"{prog()}: job {command.job} is not built in this version yet", file=sys.stderr)
        return 2
    async with opened_store(settings) as store:
        engine = Engine(settings, store, build_jobs)
        settle_heap()
        if command.name == "serve":
            return await engine.serve()
        if command.name == "run":
            assert command.job is not None
            return await engine.run_job(command.job)
        return await engine.drain()


# The collector's thresholds for a long-running engine process (Python's defaults are 700, 10, 10).
GC_THRESHOLDS = (10_000, 20, 20)


def settle_heap() -> None:
    """Before a long-running command starts its jobs: collect once, then freeze what exists (modules, settings,
    templates, the engine's own objects, all of it kept for the life of the process) out of the collector's way,
    and collect the young generation less often. Issue 17's benchmark measured full collections every ~3 s taking
    55-76 ms at 512 records in flight, 11% of the wall time, each a stall after which the rate budget's delayed
    requests reached Digital River together. Only for a process of its own (serve, run, drain): never in-process
    under tests, where frozen objects would never be collected."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command = parse(sys.argv[1:] if argv is None else argv)
    except HelpRequested as exc:
        print(exc)
        return 0
    except UsageError as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return 2
    try:
        # demo and sandbox bring their own database and Digital River: read the rest as `migrate` does.
        settings = load(command="migrate" if command.name in ("demo", "sandbox") else command.name)
    except SettingsError as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return 2
    from engine.settings import misspelt_settings

    misspelt = misspelt_settings()
    if misspelt and command.name == "serve":
        # A long-running engine with a setting silently at its default (DATABASE_ULR: an empty embedded
        # database) looks healthy and does nothing: refuse instead.
        name, known = misspelt[0]
        print(f"{prog()}: unknown variable {name} looks like the setting {known}; serve does not start with a "
              f"misspelt setting (fix or unset {name})", file=sys.stderr)
        return 2

    from engine.logs import configure

    # Commands whose stdout is their answer (`status --json` is read by machines) log on stderr.
    answers = command.name in ("status", "forecast", "pause", "resume", "retry")
    stream: TextIO = sys.stderr if answers else sys.stdout
    log_level, log_format = settings.log_level, settings.log_format
    if command.name == "demo":
        from engine.demo import DemoUsageError, demo_log_path, parse_options

        try:
            parse_options(command.options)
        except DemoUsageError as exc:
            print(f"{prog()}: {exc}", file=sys.stderr)
            return 2
        # The demo shows progress and a summary; the engine's log (warnings unless LOG_LEVEL asks for more: the
        # demo's bad records are meant to fail) goes to a file the summary names.
        log_path = demo_log_path(settings.data_dir)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stream = log_path.open("w", encoding="utf-8")  # open for the life of the process
        log_level = settings.log_level if os.environ.get("LOG_LEVEL") else "warning"
        log_format = settings.log_format if os.environ.get("LOG_FORMAT") else "json"
    configure(log_level, log_format, settings.app_log_level, settings.secrets, stream=stream)
    from engine.logs import get_logger

    for name, known in misspelt:
        get_logger(component="settings").warning("setting_unknown", variable=name, did_you_mean=known,
                                                 detail="not a drjobs setting; the setting keeps its default")
    from engine.settings import storefronts_without_key

    for label in storefronts_without_key(settings):
        get_logger(component="settings").warning(
            "storefront_without_key", storefront=label,
            detail=f"DR_API_KEY_{label} is unset: this storefront's records wait, untouched, until it is set")
    if command.name == "serve" and not settings.database_url:
        get_logger(component="settings").warning(
            "embedded_database", data_dir=os.path.abspath(settings.data_dir),
            detail="DATABASE_URL is unset: serve runs on the embedded PostgreSQL under DATA_DIR, which only this "
                   "machine sees; set DATABASE_URL to the production database")
    if command.name == "sandbox":
        from sandbox.server import main as sandbox_main

        return sandbox_main(command.options)
    from engine.database import DatabaseUnavailable
    from engine.schema import MigrationError

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(command, settings))
    except (DatabaseUnavailable, MigrationError) as exc:
        print(f"{prog()}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (a quarter less CPU per request here), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def console() -> None:
    """The `drjobs` console script."""
    sys.exit(main())
