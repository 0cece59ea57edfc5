"""Structured logs: JSON lines, bound ids, secrets removed, the application-log sink's level and bounds."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from engine.logs import AppLogSink, configure, get_logger, install_app_log, redact

SECRET = "sk_test_SuperSecret123456"


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    install_app_log(None)
    structlog.contextvars.clear_contextvars()
    # configure() bound pytest's captured stdout, which closes after the test.
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_json_lines_carry_event_level_time_and_bound_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    structlog.contextvars.bind_contextvars(actor="recurring-payments", run_id=7, record_id=42)
    get_logger().info("installment_charged", amount="10.00")
    [line] = lines(capsys)
    assert line["event"] == "installment_charged"
    assert line["level"] == "info"
    assert line["actor"] == "recurring-payments" and line["run_id"] == 7 and line["record_id"] == 42
    assert line["timestamp"].endswith("Z")


def test_secret_values_and_secret_keys_are_removed(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json", secrets=[SECRET])
    get_logger().info("dr_request_failed", headers={"Authorization": f"Bearer {SECRET}"},
                      note=f"key was {SECRET}", api_key=SECRET, other_key="sk_live_AnotherOne99")
    out = capsys.readouterr().out
    assert SECRET not in out and "sk_live_AnotherOne99" not in out
    line = json.loads(out)
    assert line["headers"]["Authorization"] == "[redacted]"
    assert line["note"] == "key was [redacted]"


def test_secret_in_an_exception_is_removed(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json", secrets=[SECRET])
    try:
        raise RuntimeError(f"refused key {SECRET}")
    except RuntimeError as exc:
        get_logger().error("job_run_crashed", exc_info=exc)
    out = capsys.readouterr().out
    assert SECRET not in out and "refused key [redacted]" in out


def test_stdout_level_filters_but_application_log_still_sees_debug(capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", "json", app_log_level="DEBUG")
    sink = AppLogSink("DEBUG")
    install_app_log(sink)
    get_logger().debug("dr_request", status=201)
    get_logger().warning("lease_lost")
    assert [line["event"] for line in lines(capsys)] == ["lease_lost"]
    assert [r["message"] for r in sink.take(10)] == ["dr_request", "lease_lost"]


def test_application_log_takes_events_at_or_above_its_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json", app_log_level="WARN", secrets=[SECRET])
    sink = AppLogSink("WARN", node="n1")
    install_app_log(sink)
    log = get_logger()
    structlog.contextvars.bind_contextvars(job="recurring-payments", record_id=9)
    log.info("installment_charged")
    log.warning("installment_declined", status=409, code="insufficient_funds", response={"token": SECRET})
    log.error("installment_failed", error=f"bad {SECRET}")
    rows = sink.take(10)
    assert [r["logging_level"] for r in rows] == ["WARN", "ERROR"]
    assert rows[0]["module_name"] == "recurring-payments"
    assert rows[0]["record_id"] == "9"
    assert rows[0]["response_status_code"] == 409
    assert "code=insufficient_funds" in rows[0]["message"]
    assert SECRET not in json.dumps(rows)
    assert rows[1]["node"] == "n1"


def test_none_level_writes_nothing() -> None:
    sink = AppLogSink("NONE")
    sink.write("ERROR", "x", "y")
    assert sink.take(10) == []


def test_full_sink_drops_and_counts_instead_of_blocking() -> None:
    sink = AppLogSink("DEBUG", capacity=2)
    for i in range(5):
        sink.write("ERROR", "m", f"row {i}")
    assert len(sink.take(10)) == 2
    assert sink.dropped == 3


def test_redact_walks_nested_structures() -> None:
    data = {"a": [{"password": "p"}, ("x", f"Bearer {SECRET}")], "n": 1}
    out = redact(data)
    assert out["a"][0]["password"] == "[redacted]"
    assert out["a"][1][1] == "Bearer [redacted]"
    assert out["n"] == 1
