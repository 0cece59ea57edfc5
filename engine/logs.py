"""Structured logs, secret redaction, and the application-log sink.

- `configure()` sets structlog up once per process: JSON lines on stdout (or the console renderer), ISO UTC
  timestamps, ids bound with `bind_contextvars` (actor, job, run, record), and `redact` applied to every event
  so no call site can leak a secret.
- Events at or above `APP_LOG_LEVEL` (except those logged with `app_logged=True`, whose caller wrote its own
  row with the request and response) are also handed to the `AppLogSink`, a bounded in-memory buffer that the
  log-writer actor flushes into `application_logs` in batches. Handing over never blocks: when the buffer is
  full the row is dropped and counted (`dropped`), and the writer reports the count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"
# Keys whose values are secrets wherever they appear (headers, bodies, settings).
_SECRET_KEY = re.compile(r"(authorization|api[-_]?key|secret|password|passwd|token|cookie)", re.IGNORECASE)
# Digital River secret keys, should one turn up inside free text.
_SECRET_TEXT = re.compile(r"\b(sk|rk)_(test|live)_[A-Za-z0-9_\-]+")
_known_secrets: tuple[str, ...] = ()

APP_LEVEL_RANK = {"NONE": 100, "ERROR": 40, "WARN": 30, "INFO": 20, "DEBUG": 10}
_STRUCTLOG_TO_APP = {"critical": "ERROR", "exception": "ERROR", "error": "ERROR", "warning": "WARN",
                     "warn": "WARN", "info": "INFO", "debug": "DEBUG"}
_STD_LEVEL = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def register_secrets(secrets: Iterable[str]) -> None:
    """Remember secret values so `redact` removes them from any text, not only from secret-named keys."""
    global _known_secrets
    _known_secrets = tuple(sorted({s for s in (*_known_secrets, *secrets) if s and len(s) >= 4}, key=len, reverse=True))


def redact_text(text: str) -> str:
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_TEXT.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of `value` (str, dict, list, tuple) with secrets replaced by `[redacted]`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class AppLogSink:
    """Buffer of `application_logs` rows waiting for the log-writer actor."""

    def __init__(self, level: str = "ERROR", node: str | None = None, capacity: int = 10_000) -> None:
        self.rank = APP_LEVEL_RANK[level]
        self.node = node
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(capacity)
        self.dropped = 0

    def enabled(self, level: str) -> bool:
        return APP_LEVEL_RANK[level] >= self.rank and self.rank < APP_LEVEL_RANK["NONE"]

    def write(
        self,
        level: str,
        module: str,
        message: str,
        *,
        record_id: object = None,
        status: int | None = None,
        request: Any = None,
        response: Any = None,
        exc: BaseException | None = None,
        stack: str | None = None,
    ) -> None:
        """Queue one row if `level` is at or above the configured level. Never blocks, never raises."""
        if not self.enabled(level):
            return
        try:
            row = self._row(level, module, message, record_id, status, request, response, exc, stack)
        except Exception:  # a body too deep to copy, say: the row is lost, the caller is not
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1

    def _row(self, level: str, module: str, message: str, record_id: object, status: int | None, request: Any,
             response: Any, exc: BaseException | None, stack: str | None) -> dict[str, Any]:
        return {
            "logging_level": level,
            "module_name": module[:200],
            "message": redact_text(message)[:10_000],
            "exception_type": type(exc).__name__ if exc is not None else None,
            "exception_message": redact_text(str(exc))[:10_000] if exc is not None else None,
            "stack_trace": redact_text(stack or _stack_of(exc))[:30_000] or None,
            "record_id": None if record_id is None else str(record_id)[:200],
            "response_status_code": status,
            "request": _as_json(redact(request)),
            "response": _as_json(redact(response)),
            "node": self.node,
        }

    def take(self, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` queued rows, without waiting."""
        rows: list[dict[str, Any]] = []
        while len(rows) < limit:
            try:
                rows.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return rows


def _stack_of(exc: BaseException | None) -> str:
    if exc is None or exc.__traceback__ is None:
        return ""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _as_json(value: Any) -> str | None:
    """jsonb text for a request or response body; text that is not JSON is stored as a JSON string."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            json.loads(value)
            return value
        except ValueError:
            return json.dumps(value[:30_000])
    return json.dumps(value, default=str)


_sink: AppLogSink | None = None


def install_app_log(sink: AppLogSink | None) -> None:
    """Route events at or above the sink's level into it (None stops that)."""
    global _sink
    _sink = sink


def app_log() -> AppLogSink | None:
    return _sink


_RESERVED = {"event", "level", "timestamp", "logger", "exc_info", "exception", "stack", "component", "actor",
             "job", "run_id", "record_id", "status", "request", "response", "node"}


def _redact_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return redact(dict(event_dict))  # type: ignore[no-any-return]


def _forward_to_app_log(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # `app_logged=True`: the caller wrote its own, richer application_logs row (request and response) already.
    if event_dict.pop("app_logged", False):
        return event_dict
    sink = _sink
    if sink is None:
        return event_dict
    level = _STRUCTLOG_TO_APP.get(method, "INFO")
    if not sink.enabled(level):
        return event_dict
    details = " ".join(f"{k}={v}" for k, v in event_dict.items() if k not in _RESERVED)
    message = str(event_dict.get("event", "")) + (f" {details}" if details else "")
    module = str(event_dict.get("job") or event_dict.get("actor") or event_dict.get("component") or "engine")
    status = event_dict.get("status")
    sink.write(
        level, module, message,
        record_id=event_dict.get("record_id"),
        status=status if isinstance(status, int) else None,
        request=event_dict.get("request"),
        response=event_dict.get("response"),
        stack=event_dict.get("exception"),
    )
    return event_dict


class _StdoutLevelFilter:
    """Drops events below LOG_LEVEL from stdout after the application log has seen them."""

    def __init__(self, level: str) -> None:
        self.threshold = _STD_LEVEL[level]

    def __call__(self, _: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if _STD_LEVEL.get(method if method != "exception" else "error", logging.INFO) < self.threshold:
            raise structlog.DropEvent
        return event_dict


def configure(log_level: str = "info", log_format: str = "json", app_log_level: str = "NONE",
              secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
    """Set structlog up for this process (on stdout unless `stream` says otherwise). Safe to call again."""
    stream = stream or sys.stdout
    register_secrets(secrets)
    # The filtering logger must let through everything either destination wants.
    wanted = [_STD_LEVEL[log_level]]
    if app_log_level != "NONE":
        wanted.append({"ERROR": logging.ERROR, "WARN": logging.WARNING, "INFO": logging.INFO,
                       "DEBUG": logging.DEBUG}[app_log_level])
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=lambda obj, **kw: json.dumps(obj, default=str))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            _forward_to_app_log,
            _StdoutLevelFilter(log_level),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min(wanted)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging()


class _ToStructlog(logging.Handler):
    """Standard-library log records (asyncpg's pool, aiohttp) as one structured line each, never a traceback on
    stderr: the pool warns with a whole traceback every time it fails to reconnect during a database outage."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = error_text(exc)
            method = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(
                record.levelno, "error")
            getattr(structlog.get_logger(component="library"), method)("library_log", **fields)
        except Exception:  # a log line must never take the engine down
            self.handleError(record)


def _route_stdlib_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _ToStructlog) for h in root.handlers):
        root.addHandler(_ToStructlog())
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """An exception as one line for a log field, a table or a message: `Type: message`, secrets removed, cut at
    `limit` characters."""
    return redact_text(f"{type(exc).__name__}: {exc}")[:limit]


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
