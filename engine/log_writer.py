"""The log-writer actor: moves `application_logs` rows from the in-memory sink into the table in batches."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from engine.actor import Actor
from engine.logs import AppLogSink, get_logger
from engine.store import Store, is_outage

log = get_logger(component="log_writer")
_COLUMNS = ("logging_level", "module_name", "message", "exception_type", "exception_message", "stack_trace",
            "record_id", "response_status_code", "request", "response", "node")


class LogWriter(Actor[None]):
    """Flushes the sink every `interval` seconds, `batch` rows per statement, and once more on stop."""

    def __init__(self, store: Store, sink: AppLogSink, *, batch: int = 500, interval: float = 1.0) -> None:
        super().__init__("log-writer")
        self.store = store
        self.sink = sink
        self.batch = batch
        self.interval = interval
        self.written = 0
        self._reported_drops = 0

    async def flush(self) -> int:
        """Write everything queued now; returns the number of rows written."""
        total = 0
        while rows := self.sink.take(self.batch):
            try:
                await self.store.execute("insert_application_logs", *_columns(rows))
            except Exception as exc:
                if is_outage(exc):
                    # The database is unreachable or restarting: keep the rows for the next flush.
                    self._requeue(rows, exc)
                    break
                # A row the database refuses (bad JSON for jsonb, say) must not block the ones behind it.
                total += await self._one_by_one(rows)
                continue
            total += len(rows)
        self.written += total
        if self.sink.dropped > self._reported_drops:
            log.warning("application_log_rows_dropped", dropped=self.sink.dropped - self._reported_drops)
            self._reported_drops = self.sink.dropped
        return total

    def _requeue(self, rows: list[dict[str, Any]], exc: BaseException) -> None:
        """The database is unreachable: keep the rows for the next flush if there is room, else count them."""
        for row in rows:
            try:
                self.sink.queue.put_nowait(row)
            except asyncio.QueueFull:
                self.sink.dropped += 1
        log.warning("application_log_write_failed", rows=len(rows), error=str(exc))

    async def _one_by_one(self, rows: list[dict[str, Any]]) -> int:
        written = 0
        for index, row in enumerate(rows):
            try:
                await self.store.execute("insert_application_logs", *_columns([row]))
                written += 1
            except Exception as exc:
                if is_outage(exc):
                    self._requeue(rows[index:], exc)
                    break
                self.sink.dropped += 1
                log.warning("application_log_row_refused", module=row["module_name"], error=str(exc)[:200])
        return written

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            await self.flush()

    async def on_stop(self) -> None:
        await self.flush()


def _columns(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[row[c] for row in rows] for c in _COLUMNS]
