"""Group commit: many concurrent callers' writes of one kind, sent as one statement.

Each in-flight record used to cost its own round trip and transaction for every write (about 0.3 ms of
PostgreSQL CPU each, docs/performance.md). A `BatchWriter` lets callers `await writer.submit(item)` as before,
but writes whatever has queued up meanwhile in one call of `write_many(items)`: no timer and no added wait
(while one batch is being written the next one gathers). Each caller gets its own item's result.

If a batch fails, its items are written one at a time, so one bad item fails only its own caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class BatchWriter(Generic[I, R]):
    """Collects submitted items and writes them with `write_many`, which returns one result per item."""

    def __init__(self, write_many: Callable[[Sequence[I]], Awaitable[Sequence[R]]], *, max_batch: int = 200,
                 name: str = "batch") -> None:
        self.write_many = write_many
        self.max_batch = max_batch
        self.name = name
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: I) -> R:
        """Write `item` with the next batch and return its result (or raise its error)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A caller cancelled while its item is written (shutdown, the run cancelled) no longer reads the result:
        # read its error here, so a failed write is never reported as "exception was never retrieved".
        future.add_done_callback(_retrieve)
        self._pending.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush(), name=f"{self.name}:flush")
        # The write must finish even if this caller is cancelled: others share it, and a charge's record must
        # be written once its order exists.
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                await self._write(batch)
        except asyncio.CancelledError:
            for _, future in self._pending:
                future.cancel()
            self._pending = []
            raise
        finally:
            self._flushing = None

    async def _write(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self.write_many([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._write([one])
            elif not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
