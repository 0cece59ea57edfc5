"""Metrics: every series appears in the exposition after its call, and moves with later calls.

The database gauges (`refresh_from_store`) are tested against a real PostgreSQL in tests/integration/test_http.py.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from engine.metrics import DR_REQUEST_BUCKETS, Metrics

JOB = "recurring-payments"


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of `render()`, parsed back: (name, labels) → value."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


DS = "DefaultStore"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, frozenset(labels.items())))


def test_a_finished_run_counts_the_run_its_records_and_its_duration() -> None:
    m = Metrics()
    m.run_finished(JOB, "succeeded", claimed=5, succeeded=4, failed=1, seconds=2.0)
    assert value(m, "drjobs_job_runs_total", job=JOB, status="succeeded") == 1
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="claimed") == 5
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="succeeded") == 4
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="failed") == 1
    assert value(m, "drjobs_job_run_seconds_count", job=JOB) == 1
    assert value(m, "drjobs_job_run_seconds_sum", job=JOB) == 2.0

    m.run_finished(JOB, "succeeded", claimed=3, succeeded=3, failed=0, seconds=1.0)
    m.run_finished(JOB, "failed", claimed=0, succeeded=0, failed=0, seconds=0.5)
    assert value(m, "drjobs_job_runs_total", job=JOB, status="succeeded") == 2
    assert value(m, "drjobs_job_runs_total", job=JOB, status="failed") == 1
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="claimed") == 8
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="succeeded") == 7
    assert value(m, "drjobs_job_records_total", job=JOB, outcome="failed") == 1
    assert value(m, "drjobs_job_run_seconds_count", job=JOB) == 3
    assert value(m, "drjobs_job_run_seconds_sum", job=JOB) == 3.5


def test_record_outcomes_are_counted_by_job_and_event() -> None:
    m = Metrics()
    m.record_outcome(JOB, "installment_charged")
    m.record_outcome(JOB, "installment_charged")
    m.record_outcome(JOB, "installment_declined")
    m.record_outcome("line-item-fulfillment", "fulfillment_completed")
    assert value(m, "drjobs_record_outcomes_total", job=JOB, outcome="installment_charged") == 2
    assert value(m, "drjobs_record_outcomes_total", job=JOB, outcome="installment_declined") == 1
    assert value(m, "drjobs_record_outcomes_total", job="line-item-fulfillment",
                 outcome="fulfillment_completed") == 1


def test_dr_requests_are_counted_by_endpoint_and_status_with_error_for_no_answer() -> None:
    m = Metrics()
    m.dr_request("POST /orders", 201, 0.04)
    m.dr_request("POST /orders", 201, 0.06)
    m.dr_request("POST /orders", 409, 0.05)
    m.dr_request("GET /orders/{id}", None, 30.0)
    assert value(m, "drjobs_dr_requests_total", endpoint="POST /orders", status="201", storefront=DS) == 2
    assert value(m, "drjobs_dr_requests_total", endpoint="POST /orders", status="409", storefront=DS) == 1
    assert value(m, "drjobs_dr_requests_total", endpoint="GET /orders/{id}", status="error",
                 storefront=DS) == 1
    assert value(m, "drjobs_dr_request_seconds_count", endpoint="POST /orders") == 3
    assert value(m, "drjobs_dr_request_seconds_count", endpoint="GET /orders/{id}") == 1


def test_dr_latency_buckets_run_from_5_ms_to_30_s() -> None:
    m = Metrics()
    m.dr_request("POST /checkouts", 201, 0.004)
    m.dr_request("POST /checkouts", 201, 0.2)
    m.dr_request("POST /checkouts", 201, 29.0)
    m.dr_request("POST /checkouts", 201, 45.0)
    assert DR_REQUEST_BUCKETS[0] == 0.005 and DR_REQUEST_BUCKETS[-1] == 30.0
    bucket = {le: value(m, "drjobs_dr_request_seconds_bucket", endpoint="POST /checkouts", le=le)
              for le in ("0.005", "0.25", "10.0", "30.0", "+Inf")}
    assert bucket == {"0.005": 1, "0.25": 2, "10.0": 2, "30.0": 3, "+Inf": 4}
    assert value(m, "drjobs_dr_request_seconds_sum", endpoint="POST /checkouts") == 0.004 + 0.2 + 29.0 + 45.0


def test_rate_limit_waits_add_up_their_seconds() -> None:
    m = Metrics()
    assert value(m, "drjobs_dr_rate_limit_wait_seconds_total") == 0
    m.rate_limit_wait(0.25)
    m.rate_limit_wait(1.5)
    assert value(m, "drjobs_dr_rate_limit_wait_seconds_total") == 1.75


def test_429_answers_are_counted() -> None:
    m = Metrics()
    assert value(m, "drjobs_dr_429_total", storefront=DS) == 0
    m.rate_limited()
    m.rate_limited()
    assert value(m, "drjobs_dr_429_total", storefront=DS) == 2


def test_lost_leases_are_counted_by_table() -> None:
    m = Metrics()
    m.lease_lost("subscription_process_data", 3)
    m.lease_lost("subscription_process_data", 2)
    m.lease_lost("fulfillments", 1)
    assert value(m, "drjobs_lease_lost_total", table="subscription_process_data") == 5
    assert value(m, "drjobs_lease_lost_total", table="fulfillments") == 1


def test_in_flight_and_inbox_depth_are_read_from_the_engine_at_each_scrape() -> None:
    m = Metrics()
    in_flight = {JOB: 7, "order-fulfillment": 0}
    depth = {"recurring-payments": 1, "scheduler": 0}
    m.set_in_flight_source(lambda: dict(in_flight))
    m.set_queue_depth_source(lambda: dict(depth))
    assert value(m, "drjobs_in_flight", job=JOB) == 7
    assert value(m, "drjobs_in_flight", job="order-fulfillment") == 0
    assert value(m, "drjobs_inbox_depth", actor="recurring-payments") == 1

    in_flight[JOB] = 2
    depth["recurring-payments"] = 4
    assert value(m, "drjobs_in_flight", job=JOB) == 2
    assert value(m, "drjobs_inbox_depth", actor="recurring-payments") == 4


def test_a_failing_source_leaves_out_its_gauge_and_the_rest_renders() -> None:
    m = Metrics()

    def broken() -> dict[str, int]:
        raise RuntimeError("engine not started")

    m.set_in_flight_source(broken)
    m.set_queue_depth_source(lambda: {"node": 0})
    m.rate_limited()
    with capture_logs() as logs:
        found = scrape(m)
    assert "drjobs_in_flight" not in {name for name, _ in found}
    assert [(e["event"], e["metric"]) for e in logs] == [("metrics_source_failed", "drjobs_in_flight")]
    assert found[("drjobs_inbox_depth", frozenset({("actor", "node")}))] == 0
    assert found[("drjobs_dr_429_total", frozenset({("storefront", DS)}))] == 1


def test_database_gauges_are_absent_until_the_first_refresh() -> None:
    found = {name for name, _ in scrape(Metrics())}
    assert not found & {"drjobs_oldest_due_seconds", "drjobs_expired_leases", "drjobs_records", "drjobs_live_nodes",
                        "drjobs_metrics_db_up"}


def test_each_metrics_has_its_own_registry_apart_from_the_global_one() -> None:
    first, second = Metrics(), Metrics()
    first.rate_limited()
    assert value(first, "drjobs_dr_429_total", storefront=DS) == 1
    assert value(second, "drjobs_dr_429_total", storefront=DS) == 0
    assert REGISTRY.get_sample_value("drjobs_dr_429_total", {"storefront": DS}) is None


def test_render_is_the_prometheus_text_format() -> None:
    m = Metrics()
    assert m.content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = m.render().decode()
    assert "# TYPE drjobs_dr_429_total counter" in text
    assert 'drjobs_dr_429_total{storefront="DefaultStore"} 0.0' in text
