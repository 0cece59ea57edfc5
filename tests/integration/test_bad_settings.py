"""Bad settings: every variable of engine/settings.py with wrong types, out-of-range numbers, bad cron and bad
names, the way an operator gets them wrong.

docs/contract.md: a bad setting is one clear line on stderr naming what is wrong and what is allowed, exit 2, and
nothing written. A sample of every variable goes through a real `python run.py serve` (and `run`, `drain`);
the many more values behind them go through `engine.settings.load`, which is what those commands call first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.settings import JOBS, SettingsError, env_prefix, load
from engine.store import Store
from tests.support import TEST_KEY, engine_env, run_command

KEY = "sk_test_CANARY_settings_0123456789"
# The variables `load` must refuse each of these for; the text after the variable names what is allowed.
BAD: dict[str, list[tuple[str, str]]] = {
    "DATABASE_URL": [("mysql://u:hunter2@db/x", "postgres:// or postgresql://"), ("postgresql://u:p@h:99999/db",
                     "Port out of range"), ("postgresql://[::1/db", "Invalid IPv6 URL"), ("localhost:5432",
                     "postgres://"), ("postgresql://h/db?password=hunter2 x", "without spaces")],
    "DR_API_URL": [("ftp://dr", "http:// or https://"), ("http:///orders", "a host name"), ("http://[oops",
                   "Invalid IPv6 URL"), ("https://dr:notaport", "Port could not be cast"), ("api.digitalriver.com",
                   "http:// or https://"), ("https://api.digital river.com", "without spaces")],
    "DR_API_KEY": [("sk_test_has a space", "without spaces"), ("sk_test_tab\there", "without spaces"),
                   ("sk_test_\x1b[31m", "control characters")],
    "DR_API_VERSION": [("latest", "API version date"), ("2024-8-21", "API version date"), ("2024-02-30",
                       "API version date"), ("21-08-2024", "API version date")],
    "DR_TIMEOUT_SECONDS": [("soon", "a number from 0.1 to 600.0"), ("0", "0.1 to 600.0"), ("-5", "0.1 to 600.0"),
                           ("601", "0.1 to 600.0"), ("nan", "a number"), ("inf", "a number"), ("1_0", "a number"),
                           ("٣", "a number"), ("30s", "a number")],
    "DR_MAX_REQUESTS_PER_SECOND": [("nan", "a number"), ("0", "0.1 to 100000.0"), ("-20", "0.1"), ("1e9", "100000"),
                                   ("twenty", "a number")],
    "CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT": [("-1", "a whole number from 1 to 1000000"), ("2.5", "whole number"),
                                           ("1e3", "whole number"), ("1000001", "1 to 1000000")],
    "CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE": [("0", "1 to 10000"), ("lots", "whole number"), ("10001", "10000")],
    "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT": [("lots", "whole number"), ("1_000", "whole number"),
                                              ("99999999999999999999", "1 to 1000000")],
    "RECURRING_PAYMENT_BATCH_SIZE": [("0", "1 to 10000"), ("５０", "whole number"), ("50.0", "whole number")],
    "SUBSCRIPTION_RETRY_COUNT": [("-3", "0 to 100"), ("101", "0 to 100"), ("three", "whole number")],
    "FULFILLMENT_QUERY_LIMIT": [("x", "whole number"), ("0", "1 to 1000000")],
    "FULFILLMENT_RETRY_LIMIT": [("1e3", "whole number"), ("-1", "0 to 100")],
    "SCHEDULE_TIME_ZONE": [("Mars/Olympus", "IANA time zone"), ("Europe", "IANA time zone"), ("CET+1",
                           "IANA time zone"), ("../etc/passwd", "IANA time zone"), ("x" * 300, "IANA time zone")],
    "APP_LOG_LEVEL": [("LOUD", "one of NONE, ERROR, WARN, INFO, DEBUG"), ("WARNING", "WARN"), ("3", "one of")],
    "APP_LOG_RETENTION_DAYS": [("0", "1 to 36500"), ("forever", "whole number"), ("36501", "36500")],
    "LOG_LEVEL": [("verbose", "one of debug, info, warning, error"), ("warn", "warning"), ("10", "one of")],
    "LOG_FORMAT": [("xml", "one of json, console"), ("text", "json, console")],
    "LEASE_SECONDS": [("1", "5 to 86400"), ("soon", "whole number"), ("86401", "86400"), ("5m", "whole number")],
    "SHUTDOWN_GRACE_SECONDS": [("-1", "0.0 to 3600.0"), ("3601", "3600"), ("half a minute", "a number")],
    "HTTP_HOST": [("bad host", "host name or an IP address"), ("-start", "host name"), ("a" * 254, "host name"),
                  ("http://0.0.0.0", "host name")],
    "HTTP_PORT": [("70000", "0 to 65535"), ("-1", "0 to 65535"), ("http", "whole number")],
    "WEBHOOK_HOST": [("bad host", "host name or an IP address"), ("http://0.0.0.0", "host name")],
    "WEBHOOK_PORT": [("70000", "0 to 65535"), ("of", "whole number"), ("-1", "0 to 65535")],
    "WEBHOOK_TOLERANCE_SECONDS": [("0", "1 to 86400"), ("5m", "whole number"), ("86401", "86400")],
    "DR_WEBHOOK_SECRET": [("whsec has space", "without spaces"), ("whsec_\x1b[31m", "control characters")],
    "ADMIN_TOKEN": [("too-short", "at least 16 characters"), ("admin token with spaces", "without spaces"),
                    ("admin-token-0123456789\x1b[31m", "control characters")],
    "NODE_NAME": [("x" * 201, "at most 200 characters"), ("node\x07one", "printable")],
    "DATABASE_POOL_SIZE": [("1", "2 to 200"), ("201", "2 to 200"), ("many", "whole number")],
    "DATABASE_POOLER": [("pgbouncer", "one of none, transaction"), ("session", "none, transaction"),
                        ("statement", "none, transaction")],
    "NODE_LOST_SECONDS": [("2", "3.0 to 3600.0"), ("3601", "3600"), ("a minute", "a number")],
}
for _job in JOBS:
    _prefix = env_prefix(_job)
    BAD[f"{_prefix}_CONCURRENCY"] = [("0", "1 to 4096"), ("4097", "4096"), ("-8", "1 to 4096"), ("eight", "whole")]
    BAD[f"{_prefix}_SCHEDULE"] = [
        ("0 0 * * *", "6 or 7 fields"),  # crontab's five fields, not Quartz's six
        ("0 0 25 * * ?", "Quartz cron"),  # hour 25
        ("every 5x", "Quartz cron"),
        ("every 0s", "Quartz cron"),
        ("0 0 * * * ?; off", "off"),
        ("0 0 0 30 2 ?", "never fires"),  # February 30th
        ("0 0 0 1 1 ? 1999", "never fires"),  # a year gone by
        ("0 0 0 ? * ? *", "Quartz cron"),  # neither day field restricting
        ("0 0 * * * ?\n0 5 * * * ?", "Quartz cron"),  # two lines instead of ';'
        ("x" * 5_000, "Quartz cron"),
    ]
# Variables with no value that could be wrong: any path will do for the embedded database's directory.
NOT_VALIDATED = {"DATA_DIR"}


def bad_cases() -> Iterator[tuple[str, str, str]]:
    for name, cases in BAD.items():
        for value, allowed in cases:
            yield name, value, allowed


def case_id(name: str, value: str) -> str:
    return f"{name}={value[:24]!r}"


def settings_with(name: str, value: str):  # type: ignore[no-untyped-def]
    return load({"DR_API_KEY": KEY, name: value}, command="serve", is_terminal=False)


def assert_one_line_naming(message: str, name: str) -> None:
    assert message.startswith(f"bad setting {name}="), message
    assert "\n" not in message and message.isprintable() and len(message) <= 600, repr(message)


class RecordingEnv(Mapping[str, str]):
    """An empty environment that notes every variable asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.asked.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def test_every_variable_the_settings_read_has_bad_values_here() -> None:
    env = RecordingEnv({"DR_API_KEY": KEY})
    load(env, command="serve", is_terminal=False)
    assert env.asked - NOT_VALIDATED == set(BAD), "a new setting needs its bad values in BAD"


@pytest.mark.parametrize(("name", "value", "allowed"), list(bad_cases()),
                         ids=[case_id(n, v) for n, v, _ in bad_cases()])
def test_bad_value_is_one_line_naming_the_variable_and_what_is_allowed(name: str, value: str, allowed: str) -> None:
    with pytest.raises(SettingsError) as refused:
        settings_with(name, value)
    message = str(refused.value)
    assert refused.value.name == name
    assert_one_line_naming(message, name)
    assert allowed in message, message
    if name in ("DR_API_KEY", "DR_WEBHOOK_SECRET", "ADMIN_TOKEN"):
        assert f"{name}=<redacted>" in message and value not in message
    for secret in ("hunter2", "u:p@"):
        assert secret not in message


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("DR_TIMEOUT_SECONDS", " 0.1 ", 0.1),  # the bounds themselves, spaces around
    ("DR_TIMEOUT_SECONDS", "600", 600.0),
    ("DR_TIMEOUT_SECONDS", "1e1", 10.0),
    ("LEASE_SECONDS", "+30", 30),
    ("HTTP_PORT", "0", 0),
    ("SUBSCRIPTION_RETRY_COUNT", "0", 0),
    ("APP_LOG_LEVEL", "debug", "DEBUG"),  # levels in either case
    ("LOG_LEVEL", "WARNING", "warning"),
    ("HTTP_HOST", "::", "::"),
    ("HTTP_HOST", "[::1]", "[::1]"),
    ("DATABASE_URL", "postgresql:///drjobs?host=/var/run/postgresql", "postgresql:///drjobs?host=/var/run/postgresql"),
    ("DR_API_VERSION", "2024-02-29", "2024-02-29"),
    ("DATABASE_POOLER", " Transaction ", "transaction"),
    ("RECURRING_PAYMENTS_SCHEDULE", "", "0 0 * * * ?"),  # empty is unset: the default
], ids=lambda v: str(v)[:30])
def test_values_at_the_edges_are_accepted(name: str, value: str, expected: object) -> None:
    s = settings_with(name, value)
    attribute = {"RECURRING_PAYMENTS_SCHEDULE": lambda: s.jobs["recurring-payments"].schedule.text}.get(
        name, lambda: getattr(s, name.lower()))
    assert attribute() == expected


def test_misspelt_job_variable_is_not_an_error_today_and_the_job_keeps_its_default() -> None:
    """`RECURING_PAYMENTS_CONCURRENCY` (one R) names no job: the contract lists the variables it reads and says
    nothing of others, so the engine ignores it (with a warning, below) and the real job keeps its default."""
    s = load({"DR_API_KEY": KEY, "RECURING_PAYMENTS_CONCURRENCY": "2", "RECURRING_PAYMENT_CONCURRENCY": "2",
              "ORDER_FULFILMENT_SCHEDULE": "garbage"}, command="serve", is_terminal=False)
    assert s.jobs["recurring-payments"].concurrency == 32
    assert s.jobs["order-fulfillment"].schedule.text == "0 0/5 * * * ?"


def test_misspelt_variables_are_named_with_the_setting_they_resemble() -> None:
    from engine.settings import misspelt_settings

    env = {"RECURING_PAYMENTS_CONCURRENCY": "2", "RECURRING_PAYMENT_CONCURRENCY": "2",
           "ORDER_FULFILMENT_SCHEDULE": "x", "DR_API_KYE": "k", "PATH": "/bin", "HOME": "/root",
           "DR_API_KEY": KEY, "POSTGRES_PASSWORD": "x", "LOG_LEVEL": "info"}
    assert misspelt_settings(env) == [
        ("DR_API_KYE", "DR_API_KEY"),
        ("ORDER_FULFILMENT_SCHEDULE", "ORDER_FULFILLMENT_SCHEDULE"),
        ("RECURING_PAYMENTS_CONCURRENCY", "RECURRING_PAYMENTS_CONCURRENCY"),
        ("RECURRING_PAYMENT_CONCURRENCY", "RECURRING_PAYMENTS_CONCURRENCY"),
    ]


ANY_NAME = st.sampled_from(sorted(BAD) + sorted(NOT_VALIDATED))
TRICKY = st.sampled_from(["", " ", "0", "-0", "+0", "1e999", "NaN", "Europe", "Etc", "America/Argentina",
                          "http://[::1", "postgresql://:@/", "every", "every 1", "0 0 0 ? * * *", "off", "OFF",
                          "0/0 * * * * ?", "60 * * * * ?", "L W # ? *", "\u2028", "９", "x" * 1000])


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(name=ANY_NAME, value=st.one_of(TRICKY, st.text(max_size=60),
                                       st.text(alphabet="0123456789 *?/,-LW#;everysmhdof.:@[]", max_size=30)))
def test_any_value_of_any_variable_loads_or_is_refused_in_one_line(name: str, value: str) -> None:
    try:
        settings_with(name, value)
    except SettingsError as exc:
        assert exc.name == name
        assert_one_line_naming(str(exc), name)


# -- the same through real commands ------------------------------------------------------------------------------

# One or two per variable: a subprocess costs about half a second.
COMMAND_CASES = [
    ("serve", "DATABASE_URL", "mysql://u:hunter2@db/x"),
    ("serve", "DATABASE_URL", "postgresql://u:p@h:99999/db"),
    ("serve", "DR_API_URL", "ftp://dr"),
    ("serve", "DR_API_URL", "http://[oops"),
    ("serve", "DR_API_KEY", "sk_test_CANARY has a space"),
    ("serve", "DR_API_VERSION", "latest"),
    ("serve", "DR_TIMEOUT_SECONDS", "soon"),
    ("serve", "DR_TIMEOUT_SECONDS", "0"),
    ("serve", "DR_MAX_REQUESTS_PER_SECOND", "nan"),
    ("serve", "CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT", "2.5"),
    ("serve", "CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE", "0"),
    ("serve", "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT", "1_000"),
    ("serve", "RECURRING_PAYMENT_BATCH_SIZE", "99999999999999999999"),
    ("serve", "SUBSCRIPTION_RETRY_COUNT", "-1"),
    ("serve", "FULFILLMENT_QUERY_LIMIT", "ten"),
    ("serve", "FULFILLMENT_RETRY_LIMIT", "101"),
    ("serve", "RECURRING_PAYMENTS_CONCURRENCY", "0"),
    ("serve", "ORDER_FULFILLMENT_CONCURRENCY", "5000"),
    ("serve", "SUBSCRIPTION_INSTALLMENTS_SCHEDULE", "0 0 * * *"),
    ("serve", "LINE_ITEM_FULFILLMENT_SCHEDULE", "0 0 25 * * ?"),
    ("serve", "LOG_CLEANUP_SCHEDULE", "every 5x"),
    ("serve", "RECURRING_PAYMENTS_SCHEDULE", "0 0 0 30 2 ?"),
    ("serve", "ORDER_FULFILLMENT_SCHEDULE", "0 0 * * * ?; off"),
    ("serve", "SCHEDULE_TIME_ZONE", "Mars/Olympus"),
    ("serve", "SCHEDULE_TIME_ZONE", "Europe"),
    ("serve", "APP_LOG_LEVEL", "LOUD"),
    ("serve", "APP_LOG_RETENTION_DAYS", "0"),
    ("serve", "LOG_LEVEL", "verbose"),
    ("serve", "LOG_FORMAT", "xml"),
    ("serve", "LEASE_SECONDS", "1"),
    ("serve", "SHUTDOWN_GRACE_SECONDS", "-1"),
    ("serve", "HTTP_HOST", "bad host"),
    ("serve", "HTTP_PORT", "70000"),
    ("serve", "NODE_NAME", "x" * 201),
    ("serve", "DATABASE_POOL_SIZE", "1"),
    ("serve", "DATABASE_POOLER", "pgbouncer"),
    ("serve", "NODE_LOST_SECONDS", "2"),
    ("run recurring-payments", "LEASE_SECONDS", "soon"),
    ("drain", "DR_MAX_REQUESTS_PER_SECOND", "0"),
    ("drain", "DR_API_KEY", ""),
]


@pytest.mark.parametrize(("command", "name", "value"), COMMAND_CASES,
                         ids=[f"{c.split()[0]}:{case_id(n, v)}" for c, n, v in COMMAND_CASES])
async def test_command_with_a_bad_setting_prints_one_line_exits_2_and_writes_nothing(
        database_url: str, store: Store, command: str, name: str, value: str) -> None:
    env = engine_env(database_url, **{name: value})
    code, out, err = await run_command(command.split(), env, timeout=30)
    assert code == 2, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"run.py: bad setting {name}="), err
    for secret in ("hunter2", TEST_KEY, "CANARY"):
        assert secret not in err
    for table in ("engine_nodes", "job_runs", "application_logs", "subscription_process_data"):
        assert await store.pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table


@pytest.mark.parametrize("args", [["run", "recuring-payments"], ["run", "RECURRING-PAYMENTS"], ["pause", "payments"],
                                  ["resume", ""]], ids=lambda a: " ".join(a))
async def test_unknown_job_name_is_one_line_exit_2_and_nothing_written(database_url: str, store: Store,
                                                                      args: list[str]) -> None:
    code, out, err = await run_command(args, engine_env(database_url), timeout=30)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"unknown job {args[1]!r}" in err, err
    assert "subscription-installments" in err  # what is allowed
    assert await store.pool.fetchval("SELECT count(*) FROM engine_nodes") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM job_controls") == 0


def test_storefront_settings_are_read_per_storefront_and_not_taken_for_misspellings() -> None:
    from engine.settings import load, misspelt_settings, storefronts_without_key

    env = {"DR_API_KEY": KEY, "DR_API_KEY_X": "sk_test_x", "DR_API_URL_EU_STORE": "https://eu.example",
           "DR_WEBHOOK_SECRET_X": "whsec_x", "DR_MAX_REQUESTS_PER_SECOND_X": "10", "DR_API_KYE": "k"}
    assert misspelt_settings(env) == [("DR_API_KYE", "DR_API_KEY")]
    settings = load(env, is_terminal=False)
    x = settings.storefront("x")
    assert x is not None and (x.api_key, x.max_requests_per_second, x.webhook_secret) == ("sk_test_x", 10.0, "whsec_x")
    assert x.api_url == settings.dr_api_url  # DR_API_URL_X unset: DR_API_URL's
    eu = settings.storefront("EU Store")
    assert eu is not None and eu.api_key is None and eu.api_url == "https://eu.example"
    assert storefronts_without_key(settings) == ["EU_STORE"]
    assert {"sk_test_x", "whsec_x", KEY} <= set(settings.secrets)


@pytest.mark.parametrize(("env", "named", "why"), [
    ({"DR_API_KEY_eu": "sk_test_CANARY_lower"}, "DR_API_KEY_eu", "STORE the storefront's name upper-cased"),
    ({"DR_API_KEY_": "sk_test_CANARY_empty"}, "DR_API_KEY_", "STORE the storefront's name upper-cased"),
    ({"DR_API_KEY_EU": "sk_test_CANARY bad"}, "DR_API_KEY_EU", "without spaces"),
    ({"DR_WEBHOOK_SECRET_EU": "whsec_CANARY\tx"}, "DR_WEBHOOK_SECRET_EU", "without spaces"),
    ({"DR_MAX_REQUESTS_PER_SECOND_EU": "fast"}, "DR_MAX_REQUESTS_PER_SECOND_EU", "a number from 0.1"),
    ({"DR_API_URL_EU": "ftp://x"}, "DR_API_URL_EU", "a URL starting with http://"),
])
def test_a_bad_storefront_setting_is_one_line_naming_it_and_never_shows_a_secret(
        env: dict[str, str], named: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({"DR_API_KEY": KEY, **env}, command="serve", is_terminal=False)
    message = str(caught.value)
    assert message.startswith(f"bad setting {named}=") and why in message and "\n" not in message
    assert "CANARY" not in message


def test_serve_needs_a_key_of_some_storefront_and_any_one_will_do() -> None:
    with pytest.raises(SettingsError, match="DR_API_KEY_<STORE>"):
        load({"DR_WEBHOOK_SECRET_EU": "whsec_x"}, command="serve", is_terminal=False)
    settings = load({"DR_API_KEY_EU_STORE": "sk_test_eu"}, command="serve", is_terminal=False)
    assert settings.dr_api_key is None and [s.label for s in settings.keyed_storefronts] == ["EU_STORE"]
    eu = settings.storefront("eu store")
    assert eu is not None and eu.max_requests_per_second == 20.0  # an sk_test_ key's default, as DR_API_KEY's
