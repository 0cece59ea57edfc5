"""The console's Forecast page: `forecast.collect` (what `drjobs forecast` prints), cached, and its charts.

The forecast reads every Active subscription (12.7 s at 1,000,000), far too slow for a page, so the page never
computes it: `ForecastCache` keeps the newest result per `days` value (KEEP values at most, the least recently
asked for dropped first) with the time it was computed. A page serves the cached result; when there is none, or it
is MAX_AGE_SECONDS old or older, the page asks for a recomputation, done by ONE background task on the console at a
time (values asked for meanwhile wait their turn), and serves the stale result meanwhile (or says it is being
computed). The console's `stop` cancels the task.

`chart()` turns one currency's rows into the numbers of a server-rendered SVG bar chart: amount per day.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from engine.console.dr_view import _nice
from engine.logs import error_text, get_logger

log = get_logger(component="console")
MAX_AGE_SECONDS = 600.0
KEEP = 5
# Chart geometry (SVG user units).
WIDTH, HEIGHT = 720.0, 180.0
LEFT, RIGHT, TOP, BOTTOM = 72.0, 12.0, 12.0, 28.0


@dataclass(frozen=True)
class Computed:
    """One forecast (`forecast.collect`'s data) and when it was computed."""

    data: dict[str, Any]
    at: datetime  # UTC, when the computation started (the forecast's "now")
    started: float  # time.monotonic() then, for its age
    seconds: float  # how long it took

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


@dataclass(frozen=True)
class Lookup:
    """What a page gets: the newest result (None: none yet), whether a newer one is on its way, the last failure."""

    result: Computed | None
    fresh: bool
    computing: bool
    error: str | None


class ForecastCache:
    """Forecasts by `days`, computed off the request path by one task at a time. `compute(days)` computes one."""

    def __init__(self, compute: Callable[[int], Awaitable[dict[str, Any]]], *, max_age: float = MAX_AGE_SECONDS,
                 keep: int = KEEP) -> None:
        self.compute = compute
        self.max_age = max_age
        self.keep = keep
        self.computations = 0
        self._results: OrderedDict[int, Computed] = OrderedDict()
        self._errors: dict[int, str] = {}
        self._wanted: OrderedDict[int, None] = OrderedDict()
        self._current: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def get(self, days: int) -> Lookup:
        """The cached forecast of `days` days; asks for a new one when there is none or it is stale."""
        result = self._results.get(days)
        if result is not None:
            self._results.move_to_end(days)
        fresh = result is not None and result.age() < self.max_age
        if not fresh:
            self._want(days)
        return Lookup(result, fresh, days == self._current or days in self._wanted, self._errors.get(days))

    def _want(self, days: int) -> None:
        if self._stopped or days == self._current:
            return
        self._wanted[days] = None
        self._wanted.move_to_end(days)
        while len(self._wanted) > self.keep:
            self._wanted.popitem(last=False)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-forecast")

    async def _run(self) -> None:
        while self._wanted:
            days, _ = self._wanted.popitem(last=False)
            self._current = days
            at, started = datetime.now(UTC), time.monotonic()
            try:
                data = await self.compute(days)
            except Exception as exc:  # a failed forecast must never take the console down: the next page retries
                self._errors[days] = error_text(exc, 300)
                log.warning("console_forecast_failed", days=days, error=self._errors[days])
                continue
            finally:
                self._current = None
            self.computations += 1
            self._errors.pop(days, None)
            self._results[days] = Computed(data, at, started, time.monotonic() - started)
            self._results.move_to_end(days)
            while len(self._results) > self.keep:
                dropped, _ = self._results.popitem(last=False)
                self._errors.pop(dropped, None)
            log.info("console_forecast_computed", days=days, seconds=round(time.monotonic() - started, 3))

    async def idle(self) -> None:
        """Wait for the task to finish what it was asked (tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        self._stopped = True
        self._wanted.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def per_currency(data: dict[str, Any]) -> list[dict[str, Any]]:
    """For each currency of the forecast: its total and the chart of its amounts per day."""
    first = date.fromisoformat(data["from"])
    days = int(data["days"])
    charts = []
    for total in data["totals"]:
        amounts = [Decimal(0)] * days
        installments = [0] * days
        for row in data["rows"]:
            if row["currency"] == total["currency"]:
                day = (date.fromisoformat(row["date"]) - first).days
                if 0 <= day < days:
                    amounts[day] += Decimal(row["amount"])
                    installments[day] += row["installments"]
        charts.append({"currency": total["currency"], "total": total,
                       "chart": chart(first, amounts, installments, total["currency"])})
    return charts


def chart(first: date, amounts: list[Decimal], installments: list[int], currency: str) -> dict[str, Any]:
    """The SVG's numbers: one bar per day (day 0 on the left), y from 0 to a round maximum above the largest day."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    days = len(amounts)
    step = plot_w / max(1, days)
    y_max = _nice(max(1.0, float(max(amounts, default=Decimal(0))) * 1.1))

    def y(value: float) -> float:
        return round(TOP + plot_h * (1 - min(value, y_max) / y_max), 1)

    bars = []
    for day, amount in enumerate(amounts):
        if amount > 0:
            top = y(float(amount))
            bars.append({"x": round(LEFT + day * step + step * 0.1, 1), "y": top,
                         "width": round(max(1.0, step * 0.8), 1), "height": round(max(0.5, y(0) - top), 1),
                         "date": (first + timedelta(days=day)).isoformat(), "amount": f"{amount:,.2f}",
                         "installments": installments[day]})
    marks = sorted({0, days // 2, days - 1}) if days > 1 else [0]
    x_ticks = [{"x": round(LEFT + day * step + step / 2, 1), "label": (first + timedelta(days=day)).isoformat()}
               for day in marks]
    y_ticks = [{"y": y(v), "label": f"{v:,.0f}" if v >= 10 else f"{v:g}"} for v in (0.0, y_max / 2, y_max)]
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": y(0),
            "bars": bars, "x_ticks": x_ticks, "y_ticks": y_ticks, "currency": currency}
