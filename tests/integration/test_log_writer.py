"""The log writer: batches rows into application_logs; a row the database refuses does not block the rest."""

from __future__ import annotations

from engine.log_writer import LogWriter
from engine.logs import AppLogSink
from engine.store import Store


async def test_rows_are_written_in_a_batch_with_secrets_removed(store: Store) -> None:
    sink = AppLogSink("INFO", node="n1")
    for i in range(3):
        sink.write("ERROR", "recurring-payments", f"failure {i}", record_id=i, status=409,
                   request={"headers": {"Authorization": "Bearer sk_test_secret123"}}, response={"code": "x"})
    assert await LogWriter(store, sink).flush() == 3
    rows = await store.pool.fetch("SELECT * FROM application_logs ORDER BY id")
    assert [r["message"] for r in rows] == ["failure 0", "failure 1", "failure 2"]
    assert all("sk_test_secret123" not in (r["request"] or "") for r in rows)
    assert rows[0]["response_status_code"] == 409 and rows[0]["node"] == "n1"


async def test_a_row_the_database_refuses_is_dropped_and_the_others_are_written(store: Store) -> None:
    sink = AppLogSink("INFO")
    sink.write("ERROR", "m", "before")
    sink.write("ERROR", "m", "refused", response={"text": "nul \u0000 byte"})  # jsonb refuses \u0000
    sink.write("ERROR", "m", "after")
    writer = LogWriter(store, sink)
    assert await writer.flush() == 2
    assert [r["message"] for r in await store.pool.fetch("SELECT message FROM application_logs ORDER BY id")] == [
        "before", "after"]
    assert sink.dropped == 1 and sink.queue.empty()


def test_a_body_too_deep_to_copy_is_dropped_not_raised() -> None:
    sink = AppLogSink("INFO")
    deep: dict[str, object] = {}
    node = deep
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    sink.write("ERROR", "m", "deep", response=deep)
    assert sink.dropped == 1
