"""ops/: the Prometheus alert rules, their promtool unit tests, the example Prometheus configuration and the Grafana
dashboard. promtool checks and runs the rules; every metric and label they and the dashboard name must be one a real
engine's /metrics exports (a `Metrics` fed through its public methods, its database gauges read from a real store)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import Metrics
from engine.settings import JOBS
from engine.store import Store
from tests.integration.factories import due_subscription, process_records

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "drjobs-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "drjobs-alerts.test.yml"
CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "drjobs-dashboard.json"

PROMTOOL = shutil.which("promtool") or next(
    (p for p in ("/usr/bin/promtool",) if os.access(p, os.X_OK)), None)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="PROMTOOL IS NOT INSTALLED, so ops/prometheus/drjobs-alerts.yml and its unit tests were NOT CHECKED: "
           "`apt-get install prometheus` (.ci/run does it when run as root on Debian)")

# Labels Prometheus adds to every scraped series (the target's), on top of the engine's own.
TARGET_LABELS = {"instance"}
PROMQL_WORDS = {
    # operators and modifiers
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    # aggregations
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "delta", "deriv",
    "exp", "floor", "histogram_quantile", "holt_winters", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "time", "timestamp", "vector", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time",
    "last_over_time", "present_over_time",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


# -- reading the files without a YAML library (the project has none): the rules file's simple, regular layout --------

def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rules() -> list[dict[str, Any]]:
    """Each rule of the rules file: {"alert", "expr", "labels"}; `expr` may be a block scalar (`|`)."""
    lines = RULES.read_text().splitlines()
    found: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert: (\S+)$", line):
            found.append({"alert": m.group(1), "expr": None, "labels": {}})
        elif m := re.match(r"(\s*)expr: ?(.*)$", line):
            rest = m.group(2).strip()
            if rest in ("|", "|-", ">", ">-"):
                body = []
                for following in lines[i + 1:]:
                    if following.strip() and indent(following) <= len(m.group(1)):
                        break
                    body.append(following.strip())
                rest = " ".join(body).strip()
            found[-1]["expr"] = rest
        elif m := re.match(r"(\s*)labels:$", line):
            for following in lines[i + 1:]:
                if indent(following) <= len(m.group(1)):
                    break
                key, _, value = following.strip().partition(": ")
                found[-1]["labels"][key] = value
    return found


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def dashboard_expressions(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]


# -- what an expression names ------------------------------------------------------------------------------------------

STRING = r'"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(r"(?<![\w$:])([a-zA-Z_:][\w:]*)\s*\{((?:[^}\"]|" + STRING + r")*)\}")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*(" + STRING + ")")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def names_in(expr: str) -> set[str]:
    """Every metric name in a PromQL expression; fails on an identifier that is neither a PromQL word nor drjobs_*."""
    bare = re.sub(STRING, '""', expr)
    bare = GROUPING.sub(" ", bare)  # label names
    bare = re.sub(r"\{[^}]*\}", " ", bare)  # matchers
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # ranges
    bare = re.sub(r"\$\w+", " ", bare)  # Grafana variables
    bare = re.sub(r"\boffset\s+\w+", " ", bare)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", bare))
    unknown = {w for w in words - PROMQL_WORDS if not w.startswith("drjobs_")}
    assert not unknown, f"{expr!r} names {sorted(unknown)}, which is no PromQL word and no drjobs metric"
    return {w for w in words if w.startswith("drjobs_")}


def matchers_in(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher."""
    return [(metric, label, op, json.loads(value))
            for metric, body in SELECTOR.findall(expr) for label, op, value in MATCHER.findall(body)]


def grouping_labels_in(expr: str) -> set[str]:
    return {label.strip() for group in GROUPING.findall(re.sub(STRING, '""', expr))
            for label in group.split(",") if label.strip()}


# -- promtool ---------------------------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_the_rules_and_finds_every_one() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    assert int(found.group(1)) == len(rules()) == RULES.read_text().count("- alert: ")
    assert all(rule["expr"] for rule in rules())


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_accepts_the_example_prometheus_configuration() -> None:
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_configuration_keeps_the_engines_job_label() -> None:
    """The rules and the dashboard select the engine's own `job` label, which needs honor_labels."""
    assert re.search(r"^\s*honor_labels: true\s*$", CONFIG.read_text(), re.M)
    assert re.search(r"^\s*- drjobs-alerts\.yml\s*$", CONFIG.read_text(), re.M)


def test_every_rule_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    fired: list[tuple[str, dict[str, str]]] = []
    quiet: set[str] = set()
    alertname = ""
    for line in RULE_TESTS.read_text().splitlines():
        if m := re.match(r"\s*alertname: (\S+)$", line):
            alertname = m.group(1)
        elif re.match(r"\s*exp_alerts: \[\]$", line):
            quiet.add(alertname)
        elif m := re.match(r"\s*- exp_labels: \{(.*)\}$", line):
            fired.append((alertname, dict(pair.strip().split(": ") for pair in m.group(1).split(","))))
    for rule in rules():
        assert rule["alert"] in quiet, f"no test where {rule['alert']} stays quiet"
        assert any(name == rule["alert"] and rule["labels"].items() <= labels.items() for name, labels in fired), \
            f"no test where {rule['alert']} {rule['labels']} fires"


def test_every_rule_has_a_duration_a_severity_and_its_reasoning() -> None:
    text = RULES.read_text()
    assert len(re.findall(r"^\s+for: \d+[smhd]$", text, re.M)) == len(rules())
    assert len(re.findall(r"^\s+summary: ", text, re.M)) == len(rules())
    assert len(re.findall(r"^\s+description: ", text, re.M)) == len(rules())
    for rule in rules():
        assert rule["labels"].get("severity") in ("critical", "warning"), rule


# -- the dashboard ----------------------------------------------------------------------------------------------------

def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["expr"].strip(), panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for expr in dashboard_expressions(board):
        assert set(re.findall(r"\$(\w+)", expr)) <= variables | {"__rate_interval", "__interval", "__range"}, expr


# -- against what the engine exports -----------------------------------------------------------------------------------

async def exported(store: Store) -> dict[str, set[str]]:
    """Sample name → label names, from a real engine's /metrics text: every counter fed once, every database gauge
    read from a store holding the rows it counts."""
    subscription = await due_subscription(store, months_behind=1)
    await process_records(store, subscription, 1, subscription_job_run_status="Failed",
                          last_error_code="checkout_unknown")
    await store.execute("node_heartbeat", store.node, 1, "test-host", "test", "{}")
    # An installment of a storefront without a key here (drjobs_storefront_waiting_records).
    await process_records(store, await due_subscription(store, storefront="Nowhere"), 1, storefront="Nowhere")
    metrics = Metrics()
    metrics.storefronts(["DefaultStore"])
    metrics.run_finished("recurring-payments", "succeeded", 3, 2, 1, 0.5)
    metrics.record_outcome("recurring-payments", "installment_charged")
    metrics.dr_request("POST /orders", 201, 0.05)
    metrics.dr_request("GET /events", None, 30.0)
    metrics.rate_limit_wait(0.25)
    metrics.rate_limited()
    metrics.lease_lost("subscription_process_data", 1)
    metrics.settlement_conflict("recurring-payments")
    metrics.dr_event_applied("order.accepted", "Processed")
    metrics.dr_events_stored("webhook", 1)
    metrics.webhook_refused("stale")
    metrics.set_in_flight_source(lambda: {"recurring-payments": 0})
    metrics.set_queue_depth_source(lambda: {"recurring-payments": 0})
    assert await metrics.refresh_from_store(store)
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


async def test_the_rules_and_the_dashboard_use_only_metrics_and_labels_the_engine_exports(store: Store) -> None:
    engine = await exported(store)
    board = dashboard()
    expressions = {f"rule {rule['alert']} {rule['labels']}": rule["expr"] for rule in rules()}
    expressions |= {f"dashboard panel {i}": expr for i, expr in enumerate(dashboard_expressions(board))}
    used: set[str] = set()
    for where, expr in expressions.items():
        names = names_in(expr)
        used |= names
        # The one expression without a metric: the dashboard's budget line, a Grafana variable.
        assert names or re.fullmatch(r"vector\(\$\w+\)", expr), f"{where}: {expr!r} names no drjobs metric"
        missing = names - engine.keys()
        assert not missing, f"{where}: {sorted(missing)} are not exported by the engine; it exports {sorted(engine)}"
        for metric, label, op, value in matchers_in(expr):
            assert label in engine[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label!r}"
            if label == "job" and op in ("=", "=~") and "$" not in value:
                assert set(value.split("|")) <= set(JOBS), f"{where}: {value!r} is not a job of {JOBS}"
        known = set().union(*(engine[name] for name in names)) | TARGET_LABELS
        assert grouping_labels_in(expr) <= known, f"{where}: groups by a label none of {sorted(names)} has"
    for variable in board["templating"]["list"]:
        query = variable.get("definition", "")
        if m := re.fullmatch(r"label_values\((\w+), (\w+)\)", query):
            assert m.group(1) in engine and m.group(2) in engine[m.group(1)] | TARGET_LABELS, query
            used.add(m.group(1))
    # The families the issue asks a panel or an alert for.
    for name in ("drjobs_job_runs_total", "drjobs_job_records_total", "drjobs_oldest_due_seconds",
                 "drjobs_dr_requests_total", "drjobs_dr_429_total", "drjobs_dr_request_seconds_bucket",
                 "drjobs_in_flight", "drjobs_live_nodes", "drjobs_dr_events_backlog", "drjobs_webhook_refusals_total",
                 "drjobs_records", "drjobs_metrics_db_up"):
        assert name in used, name


def test_the_expression_reader_catches_a_foreign_or_misspelt_metric() -> None:
    assert names_in('sum by (job) (rate(drjobs_job_runs_total{job=~"$drjobs_job"}[5m])) > 0') == {
        "drjobs_job_runs_total"}
    assert matchers_in('drjobs_dr_requests_total{endpoint="POST /orders", status=~"2.."}') == [
        ("drjobs_dr_requests_total", "endpoint", "=", "POST /orders"),
        ("drjobs_dr_requests_total", "status", "=~", "2..")]
    for wrong in ("up == 0", "sum(rate(drjob_runs_total[5m]))"):
        with pytest.raises(AssertionError):
            names_in(wrong)
