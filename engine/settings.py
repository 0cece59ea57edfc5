"""Environment variables → typed, validated settings.

Every variable of docs/contract.md is read here and nowhere else. `load()` checks them all before anything starts;
the first bad one raises `SettingsError`, whose message is the single line the command prints before it exits
with status 2: the variable, the value it had (cut to 100 characters; a URL's user and password masked), and
what is allowed. The API key's value is never repeated. Numbers are ASCII digits as an operator types them
("1_000", "inf" and other scripts' digits are refused), and a schedule that can never fire again is refused:
`off` says "never" plainly.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.cron import CronError, Schedule, parse_schedule

T = TypeVar("T")

# The six jobs, in pipeline order, with the Salesforce app's schedules and this engine's concurrency.
JOBS: tuple[str, ...] = (
    "subscription-installments",
    "recurring-payments",
    "order-fulfillment",
    "line-item-fulfillment",
    "digital-river-events",
    "log-cleanup",
)
DEFAULT_SCHEDULES: dict[str, str] = {
    "subscription-installments": "0 0 * * * ?",
    "recurring-payments": "0 0 * * * ?",
    "order-fulfillment": "0 0/5 * * * ?",
    "line-item-fulfillment": "0 0/5 * * * ?",
    "digital-river-events": "0 0/5 * * * ?",
    "log-cleanup": "0 0 0 ? * * *",
}
DEFAULT_CONCURRENCY: dict[str, int] = {job: 8 for job in JOBS} | {"recurring-payments": 32}

APP_LOG_LEVELS = ("NONE", "ERROR", "WARN", "INFO", "DEBUG")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
# What sits between the engine and PostgreSQL: nothing, or a pooler in transaction mode (PgBouncer's
# `pool_mode = transaction`), where a connection is one server session only for the length of a transaction.
DATABASE_POOLERS = ("none", "transaction")
SECRET_SETTINGS = frozenset({"DR_API_KEY", "DR_WEBHOOK_SECRET", "ADMIN_TOKEN"})
# The storefront whose settings are the unsuffixed ones (the Salesforce app's `cc_batch_SubscriptionProcessor(
# 'DefaultStore', …)`), and the per-storefront variables of the contract: `DR_API_KEY_<STORE>` and its siblings.
DEFAULT_STOREFRONT = "DefaultStore"
STOREFRONT_SETTING_PREFIXES = ("DR_API_KEY_", "DR_API_URL_", "DR_MAX_REQUESTS_PER_SECOND_", "DR_WEBHOOK_SECRET_")
_SECRET_PREFIXES = ("DR_API_KEY_", "DR_WEBHOOK_SECRET_")
_STORE_SUFFIX = re.compile(r"[A-Z0-9_]+")
# The web console's actions need ADMIN_TOKEN: at least this long, so it cannot be guessed through the sign-in form.
ADMIN_TOKEN_MIN_CHARS = 16
# Commands that talk to Digital River and so need a key.
# The Digital River API version the engine was built and checked against, sent as `digitalriver-version` unless
# DR_API_VERSION names another: the latest build of Digital River's own SDK, DigitalRiver/digital-river-php
# (branch and merge "2023-04-25"), whose models docs/digital-river.md cites field by field.
DR_API_VERSION_BUILT_FOR = "2023-04-25"
COMMANDS_NEEDING_KEY = frozenset({"serve", "run", "drain"})


def env_prefix(job: str) -> str:
    """`recurring-payments` → `RECURRING_PAYMENTS`, the prefix of its `_CONCURRENCY` and `_SCHEDULE`."""
    return job.upper().replace("-", "_")


# A value is shown in the error at most this long: the line must stay readable whatever was set.
SHOWN_VALUE_CHARS = 100
# Numbers as an operator writes them, in ASCII: not "1_000", not "inf", not digits of other scripts.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
# A host name, an IPv4 address or an IPv6 address (bracketed or not).
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]?")


class SettingsError(ValueError):
    """A setting is missing or malformed; `str()` is the one line shown to the operator."""

    def __init__(self, name: str, value: str | None, allowed: str) -> None:
        self.name = name
        if value is None:
            shown = "unset"
        elif name in SECRET_SETTINGS or name.startswith(_SECRET_PREFIXES):
            shown = "<redacted>"
        else:
            shown = repr(value)
            if len(shown) > SHOWN_VALUE_CHARS:
                shown = shown[:SHOWN_VALUE_CHARS] + "…"
        super().__init__(f"bad setting {name}={shown}: {' '.join(allowed.split())}")


@dataclass(frozen=True)
class JobSettings:
    name: str
    schedule: Schedule
    concurrency: int


def storefront_label(name: str) -> str:
    """A storefront's name as its settings spell it: `DefaultStore` itself (whose settings are the unsuffixed ones),
    any other upper-cased with every character other than A–Z and 0–9 as `_` (`EU Store` → `EU_STORE`, the STORE of
    `DR_API_KEY_EU_STORE`). Only ASCII letters are upper-cased, so `drjobs_storefront_label` in schema.sql gives
    the same answer for every name."""
    if name == DEFAULT_STOREFRONT:
        return name
    return "".join(c if "A" <= c <= "Z" or "0" <= c <= "9" else chr(ord(c) - 32) if "a" <= c <= "z" else "_"
                   for c in name)


@dataclass(frozen=True)
class StorefrontSettings:
    """One storefront's Digital River settings: `DefaultStore`'s are DR_API_KEY and its siblings, another's
    DR_API_KEY_<STORE> and theirs. `api_key` None: the storefront's records wait for a key, untouched."""

    label: str
    api_url: str
    api_key: str | None = field(repr=False)
    max_requests_per_second: float
    webhook_secret: str | None = field(repr=False)

    @property
    def variables(self) -> str:
        """The suffix of this storefront's variables: '' for DefaultStore, `_EU_STORE` for EU_STORE."""
        return "" if self.label == DEFAULT_STOREFRONT else f"_{self.label}"


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    dr_api_url: str
    dr_api_key: str | None = field(repr=False)
    dr_api_version: str
    dr_timeout_seconds: float
    dr_max_requests_per_second: float
    cc_subscriptions_batch_query_limit: int
    cc_subscription_processor_batch_size: int
    recurring_payment_process_query_limit: int
    recurring_payment_batch_size: int
    subscription_retry_count: int
    fulfillment_query_limit: int
    fulfillment_retry_limit: int
    jobs: dict[str, JobSettings]
    schedule_time_zone: ZoneInfo
    app_log_level: str
    app_log_retention_days: int
    log_level: str
    log_format: str
    lease_seconds: int
    shutdown_grace_seconds: float
    http_host: str
    http_port: int
    # The webhook listener (`WEBHOOK_PORT=off`: none, webhook_port None) and the secret its signatures use.
    dr_webhook_secret: str | None = field(repr=False)
    webhook_host: str
    webhook_port: int | None
    webhook_tolerance_seconds: int
    # The web console's actions (retry, pause, resume) need it; None: the console is read-only.
    admin_token: str | None = field(repr=False)
    node_name: str
    database_pool_size: int
    database_pooler: str
    data_dir: str
    node_lost_seconds: float
    # Every storefront with a setting, by label (storefront_label): DefaultStore always, with DR_API_KEY & co.
    storefronts: dict[str, StorefrontSettings] = field(default_factory=dict)

    @property
    def is_test_key(self) -> bool:
        return bool(self.dr_api_key and self.dr_api_key.startswith("sk_test_"))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line, a table or an exception message: every storefront's key and
        webhook secret, and the admin token."""
        values = [self.dr_api_key, self.dr_webhook_secret, self.admin_token]
        for storefront in self.storefronts.values():
            values += [storefront.api_key, storefront.webhook_secret]
        return tuple(dict.fromkeys(s for s in values if s))

    def storefront(self, name: str) -> StorefrontSettings | None:
        """The settings of the storefront named `name` (as orders and subscriptions spell it), or None."""
        return self.storefronts.get(storefront_label(name))

    @property
    def keyed_storefronts(self) -> list[StorefrontSettings]:
        """The storefronts this process can talk to Digital River for, DefaultStore first."""
        return [s for s in self.storefronts.values() if s.api_key]


class _Reader:
    """Reads one variable at a time from an environment mapping, raising `SettingsError` on the first bad one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        return self._number(name, default, lo, hi, int, "a whole number")

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        return self._number(name, default, lo, hi, float, "a number")

    def _number(self, name: str, default: T, lo: T, hi: T, kind: Callable[[str], T], what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        allowed = f"expected {what} from {lo} to {hi}"
        if not (_INTEGER if kind is int else _NUMBER).fullmatch(value):
            raise SettingsError(name, value, allowed)
        try:
            parsed = kind(value)
        except ValueError:
            raise SettingsError(name, value, allowed) from None
        if not (lo <= parsed <= hi):  # type: ignore[operator]
            raise SettingsError(name, value, allowed)
        if isinstance(parsed, float) and parsed != parsed:  # NaN
            raise SettingsError(name, value, allowed)
        return parsed

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, upper: bool) -> str:
        value = self.raw(name)
        if value is None:
            return default
        normal = value.upper() if upper else value.lower()
        if normal not in choices:
            raise SettingsError(name, value, f"expected one of {', '.join(choices)}")
        return normal


def _url(reader: _Reader, name: str, default: str | None, schemes: tuple[str, ...], *,
         host_required: bool) -> str | None:
    value = reader.raw(name)
    if value is None:
        return default
    starts = " or ".join(s + "://" for s in schemes)
    allowed = f"expected a URL starting with {starts}"
    try:
        parts = urlsplit(value)
        _port = parts.port  # a port that is not a number from 0 to 65535 raises here
    except ValueError as exc:
        raise SettingsError(name, _without_password(value), f"{exc}; {allowed}") from None
    if parts.scheme not in schemes or not (parts.netloc or parts.query or parts.path):
        raise SettingsError(name, _without_password(value), allowed)
    if host_required and not parts.hostname:
        raise SettingsError(name, _without_password(value), f"{allowed} and a host name")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise SettingsError(name, _without_password(value), f"{allowed}, without spaces or control characters")
    return value


def _without_password(url: str) -> str:
    """A URL as it may be shown: everything between the scheme and the last '@' (user and password, however
    oddly written) and the values of password-like query parameters replaced."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    url = scheme + sep + rest if sep else url
    return re.sub(r"((?:password|passwd|pwd|secret|token|sslpassword)=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def _time_zone(reader: _Reader) -> ZoneInfo:
    name = reader.raw("SCHEDULE_TIME_ZONE") or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory of the database ('Europe'), a
        raise SettingsError("SCHEDULE_TIME_ZONE", name,  # name too long for a file
                            "expected an IANA time zone such as UTC or Europe/Berlin") from None


def _host(reader: _Reader, name: str = "HTTP_HOST") -> str:
    value = reader.raw(name)
    if value is None:
        return "127.0.0.1"
    if len(value) > 253 or not _HOST.fullmatch(value):
        raise SettingsError(name, value, "expected a host name or an IP address to listen on, such as "
                                         "127.0.0.1, 0.0.0.0 or ::")
    return value


def _webhook_port(reader: _Reader) -> int | None:
    value = reader.raw("WEBHOOK_PORT")
    if value is not None and value.lower() == "off":
        return None
    return reader.integer("WEBHOOK_PORT", 8090, 0, 65_535)


def _webhook_secret(reader: _Reader, name: str = "DR_WEBHOOK_SECRET") -> str | None:
    value = reader.raw(name)
    if value is not None and (any(c.isspace() for c in value) or not value.isprintable()):
        raise SettingsError(name, value, "expected a signing secret without spaces or control characters")
    return value


def _api_key(reader: _Reader, name: str) -> str | None:
    value = reader.raw(name)
    if value is not None and (any(c.isspace() for c in value) or not value.isprintable()):
        raise SettingsError(name, value, "expected a secret key without spaces or control characters")
    return value


def _storefronts(reader: _Reader, default: StorefrontSettings) -> dict[str, StorefrontSettings]:
    """DefaultStore's settings and every other storefront's, from the DR_API_KEY_<STORE> family of variables."""
    suffixes: set[str] = set()
    for name in reader.env:
        for prefix in STOREFRONT_SETTING_PREFIXES:
            if name.startswith(prefix) and name not in KNOWN_SETTINGS and reader.raw(name) is not None:
                suffix = name[len(prefix):]
                if not _STORE_SUFFIX.fullmatch(suffix) or suffix.strip("_") == "":
                    raise SettingsError(name, reader.raw(name),
                                        f"expected {prefix}<STORE> with STORE the storefront's name upper-cased, every "
                                        "character other than A-Z and 0-9 as _ (EU Store: EU_STORE)")
                suffixes.add(suffix)
    storefronts = {default.label: default}
    for suffix in sorted(suffixes):
        key = _api_key(reader, f"DR_API_KEY_{suffix}")
        url = _url(reader, f"DR_API_URL_{suffix}", default.api_url, ("http", "https"), host_required=True)
        assert url is not None
        rate_default = 20.0 if key and key.startswith("sk_test_") else 200.0
        storefronts[suffix] = StorefrontSettings(
            label=suffix, api_url=url.rstrip("/"), api_key=key,
            max_requests_per_second=reader.number(f"DR_MAX_REQUESTS_PER_SECOND_{suffix}", rate_default, 0.1,
                                                  100_000.0),
            webhook_secret=_webhook_secret(reader, f"DR_WEBHOOK_SECRET_{suffix}"))
    return storefronts


def _admin_token(reader: _Reader) -> str | None:
    value = reader.raw("ADMIN_TOKEN")
    if value is not None and (any(c.isspace() for c in value) or not value.isprintable()
                              or len(value) < ADMIN_TOKEN_MIN_CHARS):
        raise SettingsError("ADMIN_TOKEN", value, f"expected a token of at least {ADMIN_TOKEN_MIN_CHARS} characters "
                                                  "without spaces or control characters")
    return value


def _is_date(text: str) -> bool:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def load(env: Mapping[str, str] | None = None, *, command: str = "serve", is_terminal: bool | None = None) -> Settings:
    """Read and validate every setting; raise `SettingsError` naming the first bad one."""
    reader = _Reader(os.environ if env is None else env)
    if is_terminal is None:
        is_terminal = sys.stdout.isatty()

    database_url = _url(reader, "DATABASE_URL", None, ("postgres", "postgresql"), host_required=False)
    dr_api_url = _url(reader, "DR_API_URL", "https://api.digitalriver.com", ("http", "https"), host_required=True)
    assert dr_api_url is not None
    dr_api_url = dr_api_url.rstrip("/")

    dr_api_key = _api_key(reader, "DR_API_KEY")

    dr_api_version = reader.raw("DR_API_VERSION")
    if dr_api_version is not None and not _is_date(dr_api_version):
        raise SettingsError("DR_API_VERSION", dr_api_version, "expected an API version date like 2024-08-21")
    if dr_api_version is None:
        dr_api_version = DR_API_VERSION_BUILT_FOR

    is_test_key = bool(dr_api_key and dr_api_key.startswith("sk_test_"))
    jobs = {}
    schedule_tz = _time_zone(reader)
    now = datetime.now(UTC)
    for job in JOBS:
        prefix = env_prefix(job)
        text = reader.raw(f"{prefix}_SCHEDULE") or DEFAULT_SCHEDULES[job]
        expected = "expected Quartz cron (e.g. '0 0/5 * * * ?'), several joined by ';', 'every 30s|5m|1h', or 'off'"
        try:
            schedule = parse_schedule(text, schedule_tz)
        except CronError as exc:
            # The parser's words quote the text again: left out when the text alone would fill the line.
            detail = f"{exc}; " if len(repr(text)) <= SHOWN_VALUE_CHARS else ""
            raise SettingsError(f"{prefix}_SCHEDULE", text, detail + expected) from None
        if not schedule.is_off and schedule.next_after(now) is None:
            # Feb 30, or a year gone by: almost certainly a mistake, and 'off' says "never" plainly.
            raise SettingsError(f"{prefix}_SCHEDULE", text, f"it never fires from now on; {expected}")
        concurrency = reader.integer(f"{prefix}_CONCURRENCY", DEFAULT_CONCURRENCY[job], 1, 4096)
        jobs[job] = JobSettings(job, schedule, concurrency)

    dr_max_requests_per_second = reader.number("DR_MAX_REQUESTS_PER_SECOND", 20.0 if is_test_key else 200.0, 0.1,
                                               100_000.0)
    dr_webhook_secret = _webhook_secret(reader)
    storefronts = _storefronts(reader, StorefrontSettings(
        label=DEFAULT_STOREFRONT, api_url=dr_api_url, api_key=dr_api_key,
        max_requests_per_second=dr_max_requests_per_second, webhook_secret=dr_webhook_secret))
    if command in COMMANDS_NEEDING_KEY and not any(s.api_key for s in storefronts.values()):
        raise SettingsError("DR_API_KEY", None,
                            f"a Digital River secret key (sk_test_… or live) is required by {command}: DR_API_KEY "
                            "for DefaultStore, or DR_API_KEY_<STORE> for another storefront")

    log_format_default = "console" if is_terminal else "json"
    node_name = reader.raw("NODE_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    if len(node_name) > 200 or not node_name.isprintable():
        raise SettingsError("NODE_NAME", node_name, "expected printable text of at most 200 characters")

    return Settings(
        database_url=database_url,
        dr_api_url=dr_api_url,
        dr_api_key=dr_api_key,
        dr_api_version=dr_api_version,
        dr_timeout_seconds=reader.number("DR_TIMEOUT_SECONDS", 30.0, 0.1, 600.0),
        dr_max_requests_per_second=dr_max_requests_per_second,
        cc_subscriptions_batch_query_limit=reader.integer("CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT", 2000, 1, 1_000_000),
        cc_subscription_processor_batch_size=reader.integer("CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE", 200, 1, 10_000),
        recurring_payment_process_query_limit=reader.integer(
            "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT", 2000, 1, 1_000_000),
        recurring_payment_batch_size=reader.integer("RECURRING_PAYMENT_BATCH_SIZE", 50, 1, 10_000),
        subscription_retry_count=reader.integer("SUBSCRIPTION_RETRY_COUNT", 3, 0, 100),
        fulfillment_query_limit=reader.integer("FULFILLMENT_QUERY_LIMIT", 200, 1, 1_000_000),
        fulfillment_retry_limit=reader.integer("FULFILLMENT_RETRY_LIMIT", 5, 0, 100),
        jobs=jobs,
        schedule_time_zone=schedule_tz,
        app_log_level=reader.choice("APP_LOG_LEVEL", "ERROR", APP_LOG_LEVELS, upper=True),
        app_log_retention_days=reader.integer("APP_LOG_RETENTION_DAYS", 30, 1, 36_500),
        log_level=reader.choice("LOG_LEVEL", "info", LOG_LEVELS, upper=False),
        log_format=reader.choice("LOG_FORMAT", log_format_default, LOG_FORMATS, upper=False),
        lease_seconds=reader.integer("LEASE_SECONDS", 300, 5, 86_400),
        shutdown_grace_seconds=reader.number("SHUTDOWN_GRACE_SECONDS", 30.0, 0.0, 3600.0),
        http_host=_host(reader),
        http_port=reader.integer("HTTP_PORT", 8080, 0, 65_535),
        dr_webhook_secret=dr_webhook_secret,
        webhook_host=_host(reader, "WEBHOOK_HOST"),
        webhook_port=_webhook_port(reader),
        webhook_tolerance_seconds=reader.integer("WEBHOOK_TOLERANCE_SECONDS", 300, 1, 86_400),
        admin_token=_admin_token(reader),
        node_name=node_name,
        database_pool_size=reader.integer("DATABASE_POOL_SIZE", 10, 2, 200),
        database_pooler=reader.choice("DATABASE_POOLER", "none", DATABASE_POOLERS, upper=False),
        data_dir=reader.raw("DATA_DIR") or ".data",
        node_lost_seconds=reader.number("NODE_LOST_SECONDS", 30.0, 3.0, 3600.0),
        storefronts=storefronts,
    )


# Every variable `load` reads, for `misspelt_settings`.
KNOWN_SETTINGS = frozenset({
    "DATABASE_URL", "DATABASE_POOL_SIZE", "DATABASE_POOLER", "DATA_DIR", "DR_API_URL", "DR_API_KEY", "DR_API_VERSION",
    "DR_TIMEOUT_SECONDS", "DR_MAX_REQUESTS_PER_SECOND", "CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT",
    "CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE", "RECURRING_PAYMENT_PROCESS_QUERY_LIMIT", "RECURRING_PAYMENT_BATCH_SIZE",
    "SUBSCRIPTION_RETRY_COUNT", "FULFILLMENT_QUERY_LIMIT", "FULFILLMENT_RETRY_LIMIT", "SCHEDULE_TIME_ZONE",
    "APP_LOG_LEVEL", "APP_LOG_RETENTION_DAYS", "LOG_LEVEL", "LOG_FORMAT", "LEASE_SECONDS", "SHUTDOWN_GRACE_SECONDS",
    "HTTP_HOST", "HTTP_PORT", "NODE_NAME", "NODE_LOST_SECONDS", "DR_WEBHOOK_SECRET", "WEBHOOK_HOST",
    "WEBHOOK_PORT", "WEBHOOK_TOLERANCE_SECONDS", "ADMIN_TOKEN",
    *(f"{env_prefix(job)}_{suffix}" for job in JOBS for suffix in ("SCHEDULE", "CONCURRENCY")),
})


def storefronts_without_key(settings: Settings) -> list[str]:
    """Storefronts given a setting (a URL, a budget, a webhook secret) but no key: their records wait."""
    return [s.label for s in settings.storefronts.values() if not s.api_key and s.label != DEFAULT_STOREFRONT]


def misspelt_settings(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(variable, the known one it most resembles) for set variables that look like a typo of ours.

    Not an error (other software may set similar names), but worth a warning: a misspelt variable silently
    leaves the setting at its default.
    """
    import difflib

    found = []
    for name in sorted(os.environ if env is None else env):
        if name in KNOWN_SETTINGS or not name.isupper() or name.startswith(STOREFRONT_SETTING_PREFIXES):
            continue
        close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1, cutoff=0.88)
        if close:
            found.append((name, close[0]))
    return found

