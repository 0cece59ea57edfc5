"""The sandbox's settings: what it accepts and which failures it injects, settable per test and at runtime."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The endpoint names `fault_endpoints` may list.
ENDPOINTS = ("POST /checkouts", "GET /checkouts/{id}", "POST /checkouts/{id}/sources/{sourceId}", "POST /orders",
             "GET /orders", "GET /orders/{id}", "POST /fulfillments", "GET /fulfillments", "GET /events",
             "GET /events/{id}")
_SHARES = ("error_rate", "timeout_rate", "throttle_rate", "drop_after_order_rate", "drop_after_fulfillment_rate",
           "webhook_duplicate_rate", "webhook_drop_rate")
# What a pending_payment or in_review order settles to by itself (`settle_to`).
SETTLE_OUTCOMES = ("accepted", "charge_failed", "blocked")


class ConfigError(ValueError):
    """A sandbox setting is unknown or out of range."""


@dataclass
class SandboxConfig:
    """How the sandbox behaves. Mutable: `Sandbox.configure()` and `POST /_sandbox/config` change it live.

    Shares (`*_rate`) are probabilities from 0 to 1, drawn from one `random.Random(seed)` in arrival order, so a
    sequential test sees the same outcomes every run.
    """

    # Accepted secret key: exactly `api_key` when set, otherwise any bearer token starting with `key_prefix`.
    api_key: str | None = None
    key_prefix: str = "sk_test_"
    # Added latency per API request: `latency_ms`, or uniform in [latency_ms, latency_max_ms] when that is set.
    latency_ms: float = 0.0
    latency_max_ms: float | None = None
    # Share of API requests answered 500.
    error_rate: float = 0.0
    # Share of API requests that hang for `timeout_seconds` (longer than the client waits), then answer 504.
    timeout_rate: float = 0.0
    timeout_seconds: float = 65.0
    # Share of API requests answered 429 with `Retry-After: retry_after_seconds`.
    throttle_rate: float = 0.0
    # Requests per second allowed (None: unlimited). Over it: 429, and every request is refused until
    # `retry_after_seconds` have passed, as Digital River does.
    rate_limit: float | None = None
    retry_after_seconds: float = 1.0
    # Share of successful POST /orders whose connection is dropped after the order was created.
    drop_after_order_rate: float = 0.0
    # Share of successful POST /fulfillments whose connection is dropped after the fulfillment was applied.
    drop_after_fulfillment_rate: float = 0.0
    # Endpoints the random failures above apply to (e.g. ["POST /orders"]); empty means all of them.
    fault_endpoints: tuple[str, ...] = ()
    # Whether unit prices ending in .91-.94 script declines and order states (see docs/sandbox.md).
    amount_rules: bool = True
    seed: int = 0
    # Request entries the ledger keeps (oldest dropped first); orders and checkouts are always kept.
    max_ledger_requests: int = 1_000_000
    # Seconds after which a pending_payment or in_review order settles by itself to `settle_to` (0: never; the
    # src_settle_* sources settle after this, or after 1 second when it is 0).
    settle_after_seconds: float = 0.0
    settle_to: str = "accepted"
    # Where every event is POSTed (None: nowhere), signed with `webhook_secret` (None: no signature header).
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # A delay uniform in [0, webhook_delay_ms] before each delivery, so deliveries arrive out of order.
    webhook_delay_ms: float = 0.0
    # Share of events delivered twice; share never delivered (still listed by GET /events).
    webhook_duplicate_rate: float = 0.0
    webhook_drop_rate: float = 0.0
    # Retry a delivery answered non-2xx (or not answered) after 0.2 s, 0.5 s and 1 s.
    webhook_retry: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field."""
        for name in _SHARES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be from 0 to 1, got {value}")
        if self.latency_ms < 0 or (self.latency_max_ms is not None and self.latency_max_ms < self.latency_ms):
            raise ConfigError("latency_ms must be >= 0 and latency_max_ms, when set, >= latency_ms")
        if self.timeout_seconds < 0 or self.retry_after_seconds < 0:
            raise ConfigError("timeout_seconds and retry_after_seconds must be >= 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigError("rate_limit must be positive (or null for unlimited)")
        self.fault_endpoints = tuple(self.fault_endpoints)
        for endpoint in self.fault_endpoints:
            if endpoint not in ENDPOINTS:
                raise ConfigError(f"fault_endpoints: unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
        if self.max_ledger_requests < 0:
            raise ConfigError("max_ledger_requests must be >= 0")
        if self.settle_after_seconds < 0:
            raise ConfigError("settle_after_seconds must be >= 0")
        if self.settle_to not in SETTLE_OUTCOMES:
            raise ConfigError(f"settle_to must be one of {', '.join(SETTLE_OUTCOMES)}, got {self.settle_to!r}")
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook_url must be an http:// or https:// URL, got {self.webhook_url!r}")
        if self.webhook_delay_ms < 0:
            raise ConfigError("webhook_delay_ms must be >= 0")

    def updated(self, changes: Mapping[str, Any]) -> SandboxConfig:
        """A validated copy with `changes` (field name → value) applied; unknown names raise `ConfigError`."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values = dataclasses.asdict(self)
        for name, value in changes.items():
            if name not in known:
                raise ConfigError(f"unknown sandbox setting {name!r}; known: {', '.join(known)}")
            values[name] = _coerce(name, value, values[name])
        try:
            return SandboxConfig(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def as_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["fault_endpoints"] = list(self.fault_endpoints)
        for secret in ("api_key", "webhook_secret"):
            if values[secret]:
                values[secret] = "[set]"
        return values


_FLOATS = {"latency_ms", "latency_max_ms", "error_rate", "timeout_rate", "timeout_seconds", "throttle_rate",
           "rate_limit", "retry_after_seconds", "drop_after_order_rate", "drop_after_fulfillment_rate",
           "settle_after_seconds", "webhook_delay_ms", "webhook_duplicate_rate", "webhook_drop_rate"}
_INTS = {"seed", "max_ledger_requests"}
_BOOLS = {"amount_rules", "webhook_retry"}
# Settings that may be null; for the webhook ones an empty string is null too.
_NULLABLE = {"api_key", "latency_max_ms", "rate_limit", "webhook_url", "webhook_secret"}


def _coerce(name: str, value: Any, current: Any) -> Any:
    """JSON values into field types, rejecting what cannot be one."""
    if name in _NULLABLE and (value is None or (value == "" and name.startswith("webhook_"))):
        return None
    try:
        if name in _FLOATS:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if name in _INTS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if name in _BOOLS:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if name == "fault_endpoints":
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {type(current).__name__}") from None


def arg_parser() -> argparse.ArgumentParser:
    """The flags of `python run.py sandbox` / `python -m sandbox`."""
    p = argparse.ArgumentParser(prog="sandbox", description="A local Digital River API for tests and demos.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--api-key", help="accept exactly this key (default: any key starting with --key-prefix)")
    p.add_argument("--key-prefix", default="sk_test_")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added latency, or its lower bound")
    p.add_argument("--latency-max-ms", type=float, help="upper bound of a uniform latency")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of 500 answers (0-1)")
    p.add_argument("--timeout-rate", type=float, default=0.0, help="share of requests that hang, then 504 (0-1)")
    p.add_argument("--timeout-seconds", type=float, default=65.0)
    p.add_argument("--throttle-rate", type=float, default=0.0, help="share of 429 answers (0-1)")
    p.add_argument("--rate-limit", type=float, help="requests per second before 429s")
    p.add_argument("--retry-after", type=float, default=1.0, dest="retry_after_seconds")
    p.add_argument("--drop-after-order-rate", type=float, default=0.0,
                   help="share of orders created and then answered by a dropped connection (0-1)")
    p.add_argument("--drop-after-fulfillment-rate", type=float, default=0.0,
                   help="share of fulfillments applied and then answered by a dropped connection (0-1)")
    p.add_argument("--fault-endpoints", default="", help=f"comma-separated subset of: {', '.join(ENDPOINTS)}")
    p.add_argument("--no-amount-rules", action="store_false", dest="amount_rules")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-after-seconds", type=float, default=0.0,
                   help="pending_payment / in_review orders settle by themselves after this (0: never)")
    p.add_argument("--settle-to", choices=SETTLE_OUTCOMES, default="accepted", help="what they settle to")
    p.add_argument("--webhook-url", help="POST every event here")
    p.add_argument("--webhook-secret", help="sign webhooks with this secret (DigitalRiver-Signature)")
    p.add_argument("--webhook-delay-ms", type=float, default=0.0, help="random delay per delivery, up to this")
    p.add_argument("--webhook-duplicate-rate", type=float, default=0.0, help="share of events delivered twice (0-1)")
    p.add_argument("--webhook-drop-rate", type=float, default=0.0, help="share of events never delivered (0-1)")
    p.add_argument("--no-webhook-retry", action="store_false", dest="webhook_retry",
                   help="do not retry a delivery answered non-2xx or not answered")
    return p


def config_from_args(argv: Sequence[str]) -> tuple[str, int, SandboxConfig]:
    """(host, port, config) from command-line flags; `argparse` exits 2 on a bad flag, `ConfigError` on a bad value."""
    args = vars(arg_parser().parse_args(list(argv)))
    host, port = args.pop("host"), args.pop("port")
    if not 0 <= port <= 65_535:
        raise ConfigError(f"--port must be 0..65535, got {port}")
    args["fault_endpoints"] = tuple(v.strip() for v in args["fault_endpoints"].split(",") if v.strip())
    return host, port, SandboxConfig(**args)
