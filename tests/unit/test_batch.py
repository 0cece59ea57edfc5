"""Group commit: concurrent submits share one write; a failing batch falls back to one item at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from engine.batch import BatchWriter


async def test_concurrent_submits_are_written_together_and_each_gets_its_result() -> None:
    calls: list[list[int]] = []

    async def write_many(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        await asyncio.sleep(0)
        return [i * 10 for i in items]

    writer: BatchWriter[int, int] = BatchWriter(write_many)
    results = await asyncio.gather(*(writer.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2, 3, 4]]


async def test_items_arriving_during_a_write_form_the_next_batch() -> None:
    calls: list[list[int]] = []
    first_started = asyncio.Event()
    release = asyncio.Event()

    async def write_many(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            first_started.set()
            await release.wait()
        return list(items)

    writer: BatchWriter[int, int] = BatchWriter(write_many)
    first = asyncio.create_task(writer.submit(1))
    await first_started.wait()
    later = [asyncio.create_task(writer.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(first, *later) == [1, 2, 3]
    assert calls == [[1], [2, 3]]


async def test_batches_are_capped() -> None:
    sizes: list[int] = []

    async def write_many(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    writer: BatchWriter[int, int] = BatchWriter(write_many, max_batch=3)
    await asyncio.gather(*(writer.submit(i) for i in range(7)))
    assert sizes == [3, 3, 1]


async def test_a_bad_item_fails_only_its_own_caller() -> None:
    async def write_many(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky row")
        return list(items)

    writer: BatchWriter[int, int] = BatchWriter(write_many)
    results = await asyncio.gather(*(writer.submit(i) for i in (12, 13, 14)), return_exceptions=True)
    assert results[0] == 12 and results[2] == 14
    assert isinstance(results[1], ValueError)


async def test_a_cancelled_caller_does_not_cancel_the_shared_write() -> None:
    written: list[int] = []
    gate = asyncio.Event()

    async def write_many(items: Sequence[int]) -> list[int]:
        await gate.wait()
        written.extend(items)
        return list(items)

    writer: BatchWriter[int, int] = BatchWriter(write_many)
    impatient = asyncio.create_task(writer.submit(1))
    patient = asyncio.create_task(writer.submit(2))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    gate.set()
    assert await patient == 2
    assert written == [1, 2]
