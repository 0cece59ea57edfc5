"""drjobs: `python run.py [serve|migrate|run JOB|drain|status [--json]|demo|sandbox [--port N]]`.

Reads the command and the settings first; anything wrong is one line on stderr and exit 2, before anything is
started or written. Then sets up logging and hands over to the engine.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.settings import JOBS, Settings, SettingsError, load

USAGE = ("usage: python run.py [serve | migrate | run JOB | drain | status [--json] | pause JOB | resume JOB | "
         "retry KIND ID | demo | sandbox [--port N]]")
COMMANDS = ("serve", "migrate", "run", "drain", "status", "pause", "resume", "retry", "demo", "sandbox")


class UsageError(Exception):
    pass


@dataclass
class Command:
    name: str
    job: str | None = None
    json: bool = False
    kind: str | None = None
    record_id: int | None = None
    options: list[str] = field(default_factory=list)


def parse(argv: Sequence[str]) -> Command:
    """The command line → a Command; UsageError names what is wrong and what is allowed."""
    args = list(argv)
    if not args:
        return Command("serve")
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        raise UsageError(USAGE)
    if name not in COMMANDS:
        raise UsageError(f"unknown command {name!r}; expected one of: {', '.join(COMMANDS)}")
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
    if name in ("demo", "sandbox"):
        return Command(name, options=rest)
    if rest:
        raise UsageError(f"{name} takes no arguments, not {' '.join(rest)!r}")
    return Command(name)


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
        async with opened_store(settings) as store:
            data = await status.collect(settings, store, set(JOB_CLASSES))
            print(status.render_json(data) if command.json else status.render_text(data))
            return 0
    if command.name == "demo":
        from engine.demo import demo

        return await demo(command.options, build_jobs)
    if command.name == "run" and command.job not in JOB_CLASSES:
        print(f"run.py: job {command.job} is not built in this version yet", file=sys.stderr)
        return 2
    async with opened_store(settings) as store:
        engine = Engine(settings, store, build_jobs)
        if command.name == "serve":
            return await engine.serve()
        if command.name == "run":
            assert command.job is not None
            return await engine.run_job(command.job)
        return await engine.drain()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    try:
        # demo and sandbox bring their own database and Digital River: read the rest as `migrate` does.
        settings = load(command="migrate" if command.name in ("demo", "sandbox") else command.name)
    except SettingsError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2

    from engine.logs import configure

    # The demo shows progress and a summary; its engine logs only warnings unless LOG_LEVEL asks for more.
    log_level = "warning" if command.name == "demo" and not os.environ.get("LOG_LEVEL") else settings.log_level
    # Commands whose stdout is their answer (`status --json` is read by machines) log on stderr.
    answers = command.name in ("status", "pause", "resume", "retry")
    configure(log_level, settings.log_format, settings.app_log_level, settings.secrets,
              stream=sys.stderr if answers else sys.stdout)
    from engine.logs import get_logger
    from engine.settings import misspelt_settings

    for name, known in misspelt_settings():
        get_logger(component="settings").warning("setting_unknown", variable=name, did_you_mean=known,
                                                 detail="not a drjobs setting; the setting keeps its default")
    if command.name == "sandbox":
        from sandbox.server import main as sandbox_main

        return sandbox_main(command.options)
    if command.name == "demo":
        from engine.demo import DemoUsageError, parse_options

        try:
            parse_options(command.options)
        except DemoUsageError as exc:
            print(f"run.py: {exc}", file=sys.stderr)
            return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(command, settings))
    except KeyboardInterrupt:
        return 130


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (a quarter less CPU per request here), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
