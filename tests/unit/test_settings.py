"""Settings: defaults, every variable typed and validated, one clear line naming the bad one."""

from __future__ import annotations

import pytest

from engine.settings import JOBS, SettingsError, env_prefix, load

KEY = "sk_test_abcdefghijklmnop"


def settings_for(**env: str):  # type: ignore[no-untyped-def]
    return load({"DR_API_KEY": KEY, **env}, command="serve", is_terminal=False)


def test_defaults_follow_the_contract() -> None:
    s = settings_for()
    assert s.database_url is None
    assert s.dr_api_url == "https://api.digitalriver.com"
    assert s.dr_timeout_seconds == 30
    assert s.dr_api_version == "2023-04-25"  # the SDK build docs/digital-river.md checks against
    assert settings_for(DR_API_VERSION="2024-08-21").dr_api_version == "2024-08-21"
    assert s.dr_max_requests_per_second == 20  # sk_test_ key
    assert s.cc_subscriptions_batch_query_limit == 2000
    assert s.cc_subscription_processor_batch_size == 200
    assert s.recurring_payment_process_query_limit == 2000
    assert s.recurring_payment_batch_size == 50
    assert s.subscription_retry_count == 3
    assert s.fulfillment_query_limit == 200
    assert s.fulfillment_retry_limit == 5
    assert s.jobs["recurring-payments"].concurrency == 32
    assert {j: s.jobs[j].concurrency for j in JOBS if j != "recurring-payments"} == dict.fromkeys(
        [j for j in JOBS if j != "recurring-payments"], 8)
    assert s.jobs["order-fulfillment"].schedule.text == "0 0/5 * * * ?"
    assert s.jobs["log-cleanup"].schedule.text == "0 0 0 ? * * *"
    assert s.app_log_level == "ERROR"
    assert s.app_log_retention_days == 30
    assert (s.log_level, s.log_format) == ("info", "json")
    assert s.lease_seconds == 300
    assert s.shutdown_grace_seconds == 30
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.node_name


def test_live_key_gets_the_live_rate_budget() -> None:
    assert load({"DR_API_KEY": "sk_live_x123"}, is_terminal=False).dr_max_requests_per_second == 200


def test_console_logs_on_a_terminal() -> None:
    assert load({"DR_API_KEY": KEY}, is_terminal=True).log_format == "console"


def test_every_job_reads_its_schedule_and_concurrency() -> None:
    env = {}
    for job in JOBS:
        env[f"{env_prefix(job)}_SCHEDULE"] = "every 30s"
        env[f"{env_prefix(job)}_CONCURRENCY"] = "3"
    s = settings_for(**env)
    for job in JOBS:
        assert s.jobs[job].schedule.text == "every 30s"
        assert s.jobs[job].concurrency == 3


def test_api_key_is_required_by_commands_that_call_digital_river() -> None:
    for command in ("serve", "run", "drain"):
        with pytest.raises(SettingsError, match="DR_API_KEY=unset"):
            load({}, command=command)
    assert load({}, command="status").dr_api_key is None
    assert load({}, command="migrate").dr_api_key is None


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("DR_TIMEOUT_SECONDS", "soon", "bad setting DR_TIMEOUT_SECONDS='soon': expected a number from 0.1 to 600.0"),
    ("DR_TIMEOUT_SECONDS", "0", "bad setting DR_TIMEOUT_SECONDS='0': expected a number from 0.1 to 600.0"),
    ("DR_MAX_REQUESTS_PER_SECOND", "nan", "DR_MAX_REQUESTS_PER_SECOND='nan'"),
    ("CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT", "-1", "expected a whole number from 1 to 1000000"),
    ("CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE", "2.5", "CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE='2.5'"),
    ("RECURRING_PAYMENT_PROCESS_QUERY_LIMIT", "lots", "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT='lots'"),
    ("RECURRING_PAYMENT_BATCH_SIZE", "0", "RECURRING_PAYMENT_BATCH_SIZE='0'"),
    ("SUBSCRIPTION_RETRY_COUNT", "-3", "SUBSCRIPTION_RETRY_COUNT='-3'"),
    ("FULFILLMENT_QUERY_LIMIT", "x", "FULFILLMENT_QUERY_LIMIT='x'"),
    ("FULFILLMENT_RETRY_LIMIT", "1e3", "FULFILLMENT_RETRY_LIMIT='1e3'"),
    ("RECURRING_PAYMENTS_CONCURRENCY", "0", "RECURRING_PAYMENTS_CONCURRENCY='0': expected a whole number from 1"),
    ("LOG_CLEANUP_SCHEDULE", "0 0 25 * * ?", "LOG_CLEANUP_SCHEDULE='0 0 25 * * ?'"),
    ("ORDER_FULFILLMENT_SCHEDULE", "every 5x", "ORDER_FULFILLMENT_SCHEDULE='every 5x'"),
    ("APP_LOG_LEVEL", "LOUD", "expected one of NONE, ERROR, WARN, INFO, DEBUG"),
    ("APP_LOG_RETENTION_DAYS", "0", "APP_LOG_RETENTION_DAYS='0'"),
    ("LOG_LEVEL", "verbose", "expected one of debug, info, warning, error"),
    ("LOG_FORMAT", "xml", "expected one of json, console"),
    ("LEASE_SECONDS", "1", "LEASE_SECONDS='1': expected a whole number from 5 to 86400"),
    ("SHUTDOWN_GRACE_SECONDS", "-1", "SHUTDOWN_GRACE_SECONDS='-1'"),
    ("HTTP_PORT", "70000", "HTTP_PORT='70000'"),
    ("DATABASE_URL", "mysql://x/y", "expected a URL starting with postgres:// or postgresql://"),
    ("DR_API_URL", "ftp://dr", "DR_API_URL='ftp://dr'"),
    ("DR_API_VERSION", "latest", "expected an API version date"),
    ("SCHEDULE_TIME_ZONE", "Mars/Olympus", "SCHEDULE_TIME_ZONE='Mars/Olympus'"),
])
def test_bad_value_names_the_variable_value_and_what_is_allowed(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_for(**{name: value})
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"bad setting {name}=")
    assert "\n" not in message


def test_bad_api_key_is_named_but_never_shown() -> None:
    with pytest.raises(SettingsError) as info:
        load({"DR_API_KEY": "sk_test_has a space"})
    assert "DR_API_KEY=<redacted>" in str(info.value)
    assert "has a space" not in str(info.value)


def test_database_password_is_not_shown_in_the_error() -> None:
    with pytest.raises(SettingsError) as info:
        settings_for(DATABASE_URL="mysql://u:hunter2@db/x")
    assert "hunter2" not in str(info.value)


def test_secrets_are_not_in_repr() -> None:
    assert KEY not in repr(settings_for())
