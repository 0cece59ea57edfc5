"""The console's Digital River page: this process's client, sampled into a ring buffer, and its chart.

`DrSampler` copies the Digital River client's counters (`DigitalRiverClient.stats`: requests by endpoint and
status, 429s, seconds waited for the rate budget) and its budget every `interval` seconds (10 s) into a ring of
`span / interval` samples (an hour), in memory: the page shows what THIS process sent over the last hour, since it
started. Other engine processes keep their own; /metrics (drjobs_dr_requests_total) is the cluster's view.

`chart()` turns the ring into the numbers of a server-rendered SVG (requests per second against the budget, 429s
and errors), and `totals()` into the hour's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.logs import get_logger

if TYPE_CHECKING:
    from engine.digital_river import DigitalRiverClient

log = get_logger(component="console")
SAMPLE_SECONDS = 10.0
SPAN_SECONDS = 3600.0
# Answers by kind, for the errors table and the chart: how Digital River answered, or why it did not.
KINDS = ("ok", "429", "4xx", "5xx", "timeout", "connection_error")
ERROR_KINDS = ("4xx", "5xx", "timeout", "connection_error")
# Chart geometry (SVG user units).
WIDTH, HEIGHT = 720.0, 220.0
LEFT, RIGHT, TOP, BOTTOM = 48.0, 12.0, 12.0, 28.0


def kind_of(status: str) -> str:
    """`ClientStats.requests` status text → one of KINDS."""
    if status in ("timeout", "connection_error"):
        return status
    if status == "429":
        return "429"
    if status.isdigit():
        code = int(status)
        if 200 <= code < 300:
            return "ok"
        if 400 <= code < 500:
            return "4xx"
        if code >= 500:
            return "5xx"
    return "5xx"


@dataclass(frozen=True)
class Sample:
    """The client's counters at one moment (cumulative since the process started) and its budget then."""

    at: float  # wall clock, seconds since the epoch
    requests: dict[tuple[str, str], int]
    waited_seconds: float
    share_per_second: float  # this process's share of the budget (the token bucket's rate)
    budget_per_second: float  # DR_MAX_REQUESTS_PER_SECOND, the whole cluster's

    def by_kind(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for (_, status), n in self.requests.items():
            counts[kind_of(status)] += n
        return counts


@dataclass
class DrSampler:
    """Samples `client` every `interval` seconds into a ring covering `span` seconds; None: no client (a process that
    does not call Digital River), and the page says so."""

    client: DigitalRiverClient | None
    interval: float = SAMPLE_SECONDS
    span: float = SPAN_SECONDS
    samples: deque[Sample] = field(init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=max(2, int(self.span / self.interval) + 1))
        self.started_at = time.time()

    def sample(self) -> Sample | None:
        """Take one sample now (also what the page does before it renders, so the newest point is current)."""
        if self.client is None:
            return None
        stats = self.client.stats
        taken = Sample(time.time(), dict(stats.requests), float(stats.rate_limit_wait_seconds),
                       float(self.client.bucket.rate), float(self.client.max_requests_per_second))
        if self.samples and taken.at - self.samples[-1].at < self.interval / 2:
            self.samples[-1] = taken  # a page view right after a tick: the newest point moves, no new point
        else:
            self.samples.append(taken)
        return taken

    def start(self) -> None:
        """Sample every `interval` seconds until `stop` (idempotent)."""
        if self._task is None and self.client is not None:
            self.sample()
            self._task = asyncio.create_task(self._run(), name="console-dr-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample()
            except Exception as exc:  # a sample must never take the console down
                log.warning("console_dr_sample_failed", error=str(exc))

    def view(self, now: float | None = None) -> dict[str, Any]:
        """Everything the page shows: the chart's geometry, the hour's totals, the budget now."""
        if self.client is None:
            return {"client": False}
        self.sample()
        now = now or time.time()
        window = [s for s in self.samples if s.at >= now - self.span - self.interval]
        return {"client": True, "interval": self.interval, "span_minutes": round(self.span / 60),
                "started_at": self.started_at, "since": window[0].at if window else now,
                "chart": chart(window, now, self.span), "totals": totals(window),
                "share_per_second": window[-1].share_per_second if window else 0.0,
                "budget_per_second": window[-1].budget_per_second if window else 0.0}


def totals(window: list[Sample]) -> dict[str, Any]:
    """The window's requests by kind and by endpoint, its rate, and its budget waits."""
    if len(window) < 2:
        return {"requests": 0, "per_second": 0.0, "peak_per_second": 0.0, "kinds": dict.fromkeys(KINDS, 0),
                "endpoints": [], "waited_seconds": 0.0, "seconds": 0.0}
    first, last = window[0], window[-1]
    delta = Counter(last.requests)
    delta.subtract(first.requests)
    kinds: Counter[str] = Counter()
    endpoints: dict[str, Counter[str]] = {}
    for (endpoint, status), n in delta.items():
        if n > 0:
            kinds[kind_of(status)] += n
            endpoints.setdefault(endpoint, Counter())[kind_of(status)] += n
    seconds = max(1e-9, last.at - first.at)
    requests = sum(kinds.values())
    peak = max((_rate(a, b) for a, b in itertools.pairwise(window)), default=0.0)
    return {
        "requests": requests,
        "per_second": requests / seconds,
        "peak_per_second": peak,
        "kinds": {k: kinds.get(k, 0) for k in KINDS},
        "endpoints": [{"endpoint": e, "requests": sum(c.values()), **{k: c.get(k, 0) for k in KINDS}}
                      for e, c in sorted(endpoints.items(), key=lambda item: -sum(item[1].values()))],
        "waited_seconds": last.waited_seconds - first.waited_seconds,
        "seconds": seconds,
    }


def _rate(a: Sample, b: Sample) -> float:
    seconds = b.at - a.at
    if seconds <= 0:
        return 0.0
    return max(0, sum(b.requests.values()) - sum(a.requests.values())) / seconds


def chart(window: list[Sample], now: float, span: float) -> dict[str, Any]:
    """The SVG's numbers: x runs from the first sample (at most `span` seconds ago, at least a minute) on the left to
    now on the right; y from 0 to a round maximum above the highest rate, and above this process's budget share
    unless that is more than three times the highest rate (then the budget line is left off and `budget_above` says
    so, or the rates would be a flat line at the bottom). Each interval between two samples gives one point of the
    rate line, one step of the budget line, and a bar of its 429s and one of its errors (per second, same y)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    shown = min(span, max(60.0, now - window[0].at)) if window else span

    def x(at: float) -> float:
        return round(LEFT + plot_w * max(0.0, min(1.0, 1 - (now - at) / shown)), 1)

    intervals = []
    for a, b in itertools.pairwise(window):
        seconds = b.at - a.at
        if seconds <= 0:
            continue
        kinds_a, kinds_b = a.by_kind(), b.by_kind()
        failed = sum(max(0, kinds_b[k] - kinds_a[k]) for k in ERROR_KINDS)
        intervals.append((a.at, b.at, _rate(a, b), max(0, kinds_b["429"] - kinds_a["429"]) / seconds,
                          failed / seconds, b.share_per_second))
    peak = max([0.0, *(i[2] for i in intervals), *(i[3] + i[4] for i in intervals)])
    share = max([0.0, *(i[5] for i in intervals)])
    budget_above = share > 3 * peak and peak > 0
    y_max = _nice(max(1.0, peak if budget_above else max(peak, share)) * 1.1)

    def y(value: float) -> float:
        return round(TOP + plot_h * (1 - min(value, y_max) / y_max), 1)

    rate_points = " ".join(f"{x(end)},{y(rate)}" for _, end, rate, _, _, _ in intervals)
    budget_points = "" if budget_above else " ".join(
        f"{x(start)},{y(share)} {x(end)},{y(share)}" for start, end, _, _, _, share in intervals)
    bars = []
    for start, end, _, throttled, errors, _ in intervals:
        width = max(1.0, x(end) - x(start) - 0.5)
        if throttled > 0:
            bars.append({"kind": "throttled", "x": x(start), "y": y(throttled), "width": round(width, 1),
                         "height": round(y(0) - y(throttled), 1)})
        if errors > 0:
            bars.append({"kind": "errors", "x": x(start), "y": y(errors), "width": round(width, 1),
                         "height": round(y(0) - y(errors), 1)})
    ticks = [{"y": y(v), "label": _label(v)} for v in (0.0, y_max / 2, y_max)]
    x_ticks = [{"x": x(now - ago), "label": _ago_label(ago, shown)}
               for ago in (shown, shown * 3 / 4, shown / 2, shown / 4, 0.0)]
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": y(0),
            "rate_points": rate_points, "budget_points": budget_points, "bars": bars, "y_ticks": ticks,
            "x_ticks": x_ticks, "y_max": y_max, "points": len(intervals), "shown_seconds": shown,
            "budget_above": share if budget_above else None}


def _ago_label(ago: float, shown: float) -> str:
    if ago == 0:
        return "now"
    return f"-{round(ago / 60)} min" if shown >= 600 else f"-{ago / 60:.1f} min" if shown >= 120 else f"-{ago:.0f} s"


def _nice(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n at or above `value`."""
    magnitude = 1.0
    while magnitude * 10 <= value:
        magnitude *= 10
    while magnitude > value:
        magnitude /= 10
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if magnitude * step >= value:
            return magnitude * step
    return magnitude * 10


def _label(value: float) -> str:
    return f"{value:g}/s" if value < 10 else f"{value:.0f}/s"
