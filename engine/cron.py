"""Schedule maths: parse schedule text and compute fire times.

Everything here is a pure function of its arguments: no clock reads, no I/O, standard library only.
Every process that parses the same text in the same zone computes the same fire times.

Grammar
-------
A schedule is one of:

``off``
    Never fires.
``every <n><unit>``
    A fixed interval, unit ``s``, ``m``, ``h`` or ``d`` (``every 30s``, ``every 90s``, ``every 5m``,
    ``every 1h``, ``every 2d``). It fires at the multiples of the interval since the Unix epoch
    (1970-01-01T00:00:00Z), whatever the zone: ``every 5m`` fires at :00, :05, :10 ... UTC.
A Quartz cron expression, as the Salesforce app writes it
    6 or 7 whitespace-separated fields ``second minute hour day-of-month month day-of-week [year]``:

    ============  =================  ==============================
    field         values             specials
    ============  =================  ==============================
    second        0-59               ``* , - /``
    minute        0-59               ``* , - /``
    hour          0-23               ``* , - /``
    day-of-month  1-31               ``* , - / ? L L-n nW LW``
    month         1-12 or JAN-DEC    ``* , - /``
    day-of-week   1-7 or SUN-SAT     ``* , - / ? L nL n#k``
    year          1970-2199          ``* , - /`` (default ``*``)
    ============  =================  ==============================

    ``a-b`` is a range, ``a,b,c`` a list, ``a/n`` / ``*/n`` / ``a-b/n`` steps (``a/n`` runs from a to the
    end of the field). Names are case-insensitive. Day-of-week counts 1-7 = SUN-SAT as Quartz does
    (not crontab's 0-6). A range may wrap around the end of its field (``22-2`` hours = 22,23,0,1,2;
    ``FRI-MON`` = Fri,Sat,Sun,Mon), except in the year field.
    Day-of-month: ``L`` the last day, ``L-n`` n days before the last day, ``nW`` the weekday (Mon-Fri)
    nearest to day n without leaving the month (no firing in months that have no day n), ``LW`` the last
    weekday of the month. Day-of-week: ``L`` alone is 7 (Saturday), ``nL`` the last day n of the month
    (``6L`` the last Friday), ``n#k`` the k-th day n of the month (``2#1`` the first Monday).
    ``?`` means "no restriction" and is allowed only in day-of-month and day-of-week. As in Quartz, one of
    the two day fields restricts the days and the other is ``?``; ``*`` in one of them is accepted as
    well (``0 0 0 ? * * *`` and ``0 0 0 * * ?`` fire every day). Both ``?``, or both restricting, is an error.
Several of the above joined by ``;``
    The union of their fire times (``0 0 * * * ?; 0 30 * * * ?``); ``off`` cannot be part of a union.

Anything else raises `CronError`, naming the bad part and what is allowed.

Time zones and daylight saving time
-----------------------------------
Cron expressions are matched against the local wall clock of the zone given to `parse_schedule`
(UTC by default); fire times are returned as aware UTC datetimes. Each matching local wall time becomes
instants by the classic (Vixie) cron rule, which depends on whether the expression is *hourly*, i.e. its
hour field covers all 24 hours (``0 0/30 * * * ?``, ``0 15 * * * ?``):

* A wall time that occurs once fires at that instant.
* A wall time that does not exist (spring-forward gap): a non-hourly expression fires at the first
  instant after the gap, i.e. at the transition (``0 30 2 * * ?`` in Europe/Berlin fires on 2026-03-29 at
  03:00 CEST = 01:00 UTC); several wall times in one gap collapse into that one firing. An hourly
  expression skips wall times in the gap: it keeps its real-time rhythm instead.
* A wall time that occurs twice (fall-back overlap): a non-hourly expression fires once, at the first
  occurrence (fold=0); an hourly expression fires at both occurrences, which are distinct real instants.

So ``0 0/30 * * * ?`` fires every 1800 real seconds all year round, with no duplicates and no holes, and
``0 30 2 * * ?`` fires exactly once per local day. In a union each expression follows the rule on its own
and the fire times are deduplicated. The same rule holds for any offset change of the zone, not only DST.

Implementation: matching wall times are found field by field (year, month, day, hour, minute, second), so
a yearly expression or ``0 0 0 1 1 ? 2099`` is answered in microseconds; each candidate wall time is
mapped to instants with `zoneinfo` (PEP 495 ``fold``), and the transition that ends a gap is located by
bisection over whole seconds.
"""

from __future__ import annotations

import calendar
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol, TypeVar

__all__ = ["MAX_YEAR", "MIN_YEAR", "CronError", "Schedule", "parse_schedule"]

MIN_YEAR = 1970
MAX_YEAR = 2199

_T = TypeVar("_T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)
_ONE_MICROSECOND = timedelta(microseconds=1)

_FIELD_NAMES = ("second", "minute", "hour", "day-of-month", "month", "day-of-week", "year")
_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW, _YEAR = range(7)
_BOUNDS = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (1, 7), (MIN_YEAR, MAX_YEAR))

_MONTH_NAMES = {name.upper(): number for number, name in enumerate(calendar.month_abbr) if name}
_DAY_ABBREVIATIONS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_DAY_NAMES = {name: number for number, name in enumerate(_DAY_ABBREVIATIONS, start=1)}
_DAY_FULL_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

_INTERVAL_RE = re.compile(r"every\s+(\S+?)\s*([A-Za-z]*)", re.IGNORECASE)
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL_UNIT_WORDS = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
_NUMBER_RE = re.compile(r"[0-9]+")
_DOM_LAST_RE = re.compile(r"L(?:-([0-9]+))?")
_DOM_NEAREST_RE = re.compile(r"([0-9]+)W")
_DOW_LAST_RE = re.compile(r"(.+)L")
_DOW_NTH_RE = re.compile(r"(.+)#(.*)")
_L_OR_W_RE = re.compile(r"(?:L.*|[0-9]+[LW])")

_ALLOWED_HELP = (
    "6 or 7 fields 'second minute hour day-of-month month day-of-week [year]' (Quartz cron, "
    "e.g. '0 0/5 * * * ?'), several joined by ';', 'every <n>s|m|h|d' or 'off'"
)


class CronError(ValueError):
    """Schedule text that cannot be parsed; the message names the bad part and what is allowed."""


class _FieldError(Exception):
    """Raised inside field parsing; `_parse_cron` adds the field name and expression."""


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


class _Part(Protocol):
    """One expression of a schedule: a Quartz expression or an interval."""

    def next_after(self, t: datetime) -> datetime | None: ...

    def last_at_or_before(self, t: datetime) -> datetime | None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: the union of the fire times of its parts (no parts: ``off``)."""

    text: str
    parts: tuple[_Part, ...]

    @property
    def is_off(self) -> bool:
        """True when the schedule never fires (``off``)."""
        return not self.parts

    def next_after(self, t: datetime) -> datetime | None:
        """The first fire time strictly after aware datetime `t` (UTC), or None if it never fires again."""
        _require_aware(t)
        found = [f for f in (part.next_after(t) for part in self.parts) if f is not None]
        return min(found, default=None)

    def last_at_or_before(self, t: datetime) -> datetime | None:
        """The latest fire time at or before aware datetime `t` (UTC), or None if it never fired."""
        _require_aware(t)
        found = [f for f in (part.last_at_or_before(t) for part in self.parts) if f is not None]
        return max(found, default=None)

    def describe(self) -> str:
        """A short human description, e.g. 'every 5 minutes at second 0' or 'at 00:00:00 every day'."""
        if not self.parts:
            return "off"
        merged = _merge_for_description(self.parts, self.text)
        if merged is not None:
            return merged.describe()
        return "; ".join(part.describe() for part in self.parts)


def parse_schedule(text: str, tz: tzinfo = UTC) -> Schedule:
    """Parse `text` (see the module docstring); cron expressions are evaluated in zone `tz`."""
    stripped = text.strip()
    if not stripped:
        raise CronError(f"empty schedule: expected {_ALLOWED_HELP}")
    if stripped.lower() == "off":
        return Schedule(text, ())
    pieces = [piece.strip() for piece in stripped.split(";")]
    parts: list[_Part] = []
    for index, piece in enumerate(pieces, start=1):
        if not piece:
            raise CronError(f"empty expression #{index} in {stripped!r}: remove the extra ';'")
        if piece.lower() == "off":
            raise CronError(f"'off' cannot be combined with other expressions in {stripped!r}")
        parts.append(_parse_part(piece, tz))
    return Schedule(text, tuple(parts))


def _require_aware(t: datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {t.isoformat()}")


def _parse_part(text: str, tz: tzinfo) -> _Part:
    if text[:5].lower() == "every":
        return _parse_interval(text)
    return _parse_cron(text, tz)


# ---------------------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _IntervalPart:
    """Fires at every multiple of `seconds` since the Unix epoch."""

    text: str
    seconds: int

    def next_after(self, t: datetime) -> datetime | None:
        period = self.seconds * 1_000_000
        return _from_epoch_microseconds((_epoch_microseconds(t) // period + 1) * period)

    def last_at_or_before(self, t: datetime) -> datetime | None:
        period = self.seconds * 1_000_000
        return _from_epoch_microseconds(_epoch_microseconds(t) // period * period)

    def describe(self) -> str:
        for unit in (86400, 3600, 60, 1):
            if self.seconds % unit == 0:
                count = self.seconds // unit
                word = _INTERVAL_UNIT_WORDS[unit]
                return f"every {word}" if count == 1 else f"every {count} {word}s"
        raise AssertionError("unreachable: every interval is a whole number of seconds")


def _parse_interval(text: str) -> _IntervalPart:
    match = _INTERVAL_RE.fullmatch(text)
    if match is None:
        raise CronError(f"bad interval {text!r}: expected 'every <n><unit>' such as 'every 30s' or 'every 5m'")
    count_text, unit = match.group(1), match.group(2).lower()
    if not _NUMBER_RE.fullmatch(count_text):
        raise CronError(f"bad interval {text!r}: {count_text!r} is not a whole number (e.g. 'every 5m')")
    if unit not in _INTERVAL_UNITS:
        raise CronError(f"bad interval {text!r}: unit {unit!r} is not one of s, m, h, d (e.g. 'every 30s')")
    count = int(count_text)
    if count < 1:
        raise CronError(f"bad interval {text!r}: the interval must be at least 1{unit}")
    seconds = count * _INTERVAL_UNITS[unit]
    if seconds > 100 * 366 * 86400:
        raise CronError(f"bad interval {text!r}: at most 100 years is allowed")
    return _IntervalPart(text, seconds)


def _epoch_microseconds(t: datetime) -> int:
    return (t - _EPOCH) // _ONE_MICROSECOND


def _from_epoch_microseconds(value: int) -> datetime | None:
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Quartz cron: parsing
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DayOfMonth:
    """Day-of-month restriction: plain days plus the L / L-n / nW / LW specials."""

    days: frozenset[int] = frozenset()
    before_last: frozenset[int] = frozenset()  # L is 0, L-n is n
    nearest_weekday: frozenset[int] = frozenset()  # nW
    last_weekday: bool = False  # LW

    def matching(self, year: int, month: int, length: int) -> set[int]:
        result = {day for day in self.days if day <= length}
        result.update(length - n for n in self.before_last if length - n >= 1)
        result.update(_nearest_weekday(year, month, day, length) for day in self.nearest_weekday if day <= length)
        if self.last_weekday:
            result.add(_nearest_weekday(year, month, length, length))
        return result


@dataclass(frozen=True)
class _DayOfWeek:
    """Day-of-week restriction (1 = Sunday ... 7 = Saturday): plain days plus nL and n#k."""

    days: frozenset[int] = frozenset()
    last_of: frozenset[int] = frozenset()  # nL
    nth: frozenset[tuple[int, int]] = frozenset()  # n#k as (n, k)

    def matching(self, year: int, month: int, length: int) -> set[int]:
        first = _quartz_weekday(year, month, 1)
        result = {day for day in range(1, length + 1) if (first + day - 2) % 7 + 1 in self.days}
        last = _quartz_weekday(year, month, length)
        result.update(length - (last - n) % 7 for n in self.last_of)
        for n, k in self.nth:
            day = 1 + (n - first) % 7 + 7 * (k - 1)
            if day <= length:
                result.add(day)
        return result


def _quartz_weekday(year: int, month: int, day: int) -> int:
    """1 = Sunday ... 7 = Saturday (Python's weekday() is 0 = Monday ... 6 = Sunday)."""
    return (calendar.weekday(year, month, day) + 1) % 7 + 1


def _nearest_weekday(year: int, month: int, day: int, length: int) -> int:
    """The Monday-Friday day nearest to `day`, staying inside the month (Quartz 'W')."""
    weekday = calendar.weekday(year, month, day)
    if weekday == calendar.SATURDAY:
        return day - 1 if day > 1 else day + 2
    if weekday == calendar.SUNDAY:
        return day + 1 if day < length else day - 2
    return day


def _parse_cron(text: str, tz: tzinfo) -> _CronPart:
    fields = text.split()
    if len(fields) not in (6, 7):
        raise CronError(
            f"bad cron expression {text!r}: expected 6 or 7 fields "
            f"'second minute hour day-of-month month day-of-week [year]', got {len(fields)}")
    if len(fields) == 6:
        fields.append("*")
    dom_text, dow_text = fields[_DOM], fields[_DOW]
    if dom_text == "?" and dow_text == "?":
        raise CronError(
            f"bad cron expression {text!r}: '?' cannot be in both day-of-month and day-of-week; "
            "put '?' in one of them and the days (or '*') in the other")
    if dom_text not in ("?", "*") and dow_text not in ("?", "*"):
        raise CronError(
            f"bad cron expression {text!r}: day-of-month {dom_text!r} and day-of-week {dow_text!r} both "
            "restrict days; as in Quartz, put '?' in one of them")
    seconds, minutes, hours = (_parse_field(text, fields, i, _parse_plain_field) for i in (_SECOND, _MINUTE, _HOUR))
    months, years = (_parse_field(text, fields, i, _parse_plain_field) for i in (_MONTH, _YEAR))
    dom = _parse_field(text, fields, _DOM, _parse_day_of_month)
    dow = _parse_field(text, fields, _DOW, _parse_day_of_week)
    return _CronPart(text, tz, seconds, minutes, hours, months, years, dom, dow)


def _parse_field(text: str, fields: list[str], field: int, parser: Callable[[str, int], _T]) -> _T:
    """Run `parser` on field number `field`, turning its complaint into a CronError that names the field."""
    try:
        return parser(fields[field], field)
    except _FieldError as exc:
        raise CronError(f"bad cron field {_FIELD_NAMES[field]!r} in {text!r}: {exc}") from None


def _parse_plain_field(text: str, field: int) -> tuple[int, ...]:
    """second, minute, hour, month or year: a set of values without specials."""
    if text == "?":
        raise _FieldError("'?' is only allowed in day-of-month or day-of-week")
    return tuple(sorted(_parse_list(text, field, _plain_item)))


def _items(text: str) -> list[str]:
    items = text.split(",")
    if not all(items):
        raise _FieldError(f"empty item in list {text!r}")
    return items


def _parse_list(text: str, field: int, parse_item: _ItemParser) -> set[int]:
    result: set[int] = set()
    for item in _items(text):
        result.update(parse_item(item, field))
    return result


class _ItemParser(Protocol):
    def __call__(self, item: str, field: int, /) -> set[int]: ...


def _plain_item(item: str, field: int) -> set[int]:
    upper = item.upper()
    if "?" in item:
        raise _FieldError("'?' is only allowed alone, in day-of-month or day-of-week")
    if "#" in item:
        raise _FieldError(f"{item!r}: '#' is only allowed in day-of-week (e.g. '2#1', the first Monday)")
    if field not in (_DOM, _DOW) and _L_OR_W_RE.fullmatch(upper) and upper not in _names(field):
        raise _FieldError(f"{item!r} is not allowed here: 'L' and 'W' are only allowed in day-of-month or day-of-week")
    return _range_item(item, field)


def _range_item(item: str, field: int) -> set[int]:
    """``*``, ``a``, ``a-b``, each optionally followed by ``/step``."""
    low, high = _BOUNDS[field]
    base, slash, step_text = item.partition("/")
    step = _parse_step(step_text, field) if slash else 1
    if base == "*":
        start, end = low, high
    elif "-" in base:
        start_text, _, end_text = base.partition("-")
        start, end = _parse_value(start_text, field), _parse_value(end_text, field)
        if end < start and field == _YEAR:
            raise _FieldError(f"range {base!r} is backwards (year ranges cannot wrap around)")
    else:
        start = _parse_value(base, field)
        end = high if slash else start
    return _expand(start, end, step, low, high)


def _expand(start: int, end: int, step: int, low: int, high: int) -> set[int]:
    """Values start..end by step; a range with end < start wraps around the field (Quartz)."""
    span = high - low + 1
    if end < start:
        end += span
    return {low + (value - low) % span for value in range(start, end + 1, step)}


def _parse_step(text: str, field: int) -> int:
    low, high = _BOUNDS[field]
    if not _NUMBER_RE.fullmatch(text):
        raise _FieldError(f"step {text!r} is not a whole number")
    step = int(text)
    if step < 1:
        raise _FieldError(f"step {step} must be at least 1")
    if step > high - low + 1:
        raise _FieldError(f"step {step} is larger than the range {low}-{high}")
    return step


def _names(field: int) -> dict[str, int]:
    if field == _MONTH:
        return _MONTH_NAMES
    if field == _DOW:
        return _DAY_NAMES
    return {}


def _parse_value(text: str, field: int) -> int:
    low, high = _BOUNDS[field]
    names = _names(field)
    if text.upper() in names:
        return names[text.upper()]
    allowed = f"{low}-{high}" + {_MONTH: " or JAN-DEC", _DOW: " or SUN-SAT (1 = SUN ... 7 = SAT)"}.get(field, "")
    if not _NUMBER_RE.fullmatch(text):
        raise _FieldError(f"{text!r} is not a valid value (allowed: {allowed})" if text else "missing value")
    value = int(text)
    if not low <= value <= high:
        raise _FieldError(f"{value} is out of range {allowed}")
    return value


def _parse_day_of_month(text: str, field: int) -> _DayOfMonth | None:
    if text in ("?", "*"):
        return None
    days: set[int] = set()
    before_last: set[int] = set()
    nearest: set[int] = set()
    last_weekday = False
    for item in _items(text):
        upper = item.upper()
        last = _DOM_LAST_RE.fullmatch(upper)
        near = _DOM_NEAREST_RE.fullmatch(upper)
        if last is not None:
            offset = int(last.group(1) or 0)
            if offset > 30:
                raise _FieldError(f"{item!r}: L-n allows n from 0 to 30")
            before_last.add(offset)
        elif upper == "LW":
            last_weekday = True
        elif near is not None:
            nearest.add(_parse_value(near.group(1), _DOM))
        elif "L" in upper or "W" in upper:
            raise _FieldError(
                f"{item!r} is not allowed here (day-of-month allows 1-31, ranges, lists, steps, L, L-n, nW, LW)")
        else:
            days.update(_parse_list(item, _DOM, _plain_item))
    return _DayOfMonth(frozenset(days), frozenset(before_last), frozenset(nearest), last_weekday)


def _parse_day_of_week(text: str, field: int) -> _DayOfWeek | None:
    if text in ("?", "*"):
        return None
    days: set[int] = set()
    last_of: set[int] = set()
    nth: set[tuple[int, int]] = set()
    for item in _items(text):
        upper = item.upper()
        last = _DOW_LAST_RE.fullmatch(upper)
        hashed = _DOW_NTH_RE.fullmatch(upper)
        if upper == "L":
            days.add(7)
        elif last is not None:
            last_of.add(_parse_value(last.group(1), _DOW))
        elif hashed is not None:
            nth.add((_parse_value(hashed.group(1), _DOW), _parse_nth(hashed.group(2))))
        elif _DOM_NEAREST_RE.fullmatch(upper) or upper.startswith("L"):
            raise _FieldError(
                f"{item!r} is not allowed here (day-of-week allows 1-7 or SUN-SAT, ranges, lists, steps, "
                "L, nL, n#k; 'W' and 'L-n' belong in day-of-month)")
        else:
            days.update(_parse_list(item, _DOW, _plain_item))
    return _DayOfWeek(frozenset(days), frozenset(last_of), frozenset(nth))


def _parse_nth(text: str) -> int:
    if not _NUMBER_RE.fullmatch(text) or not 1 <= int(text) <= 5:
        raise _FieldError(f"'#{text}': the k of n#k must be 1-5")
    return int(text)


# ---------------------------------------------------------------------------------------------------------
# Quartz cron: evaluation
# ---------------------------------------------------------------------------------------------------------

_NORMAL, _AMBIGUOUS, _GAP = "normal", "ambiguous", "gap"


@dataclass(frozen=True)
class _WallTime:
    """How one local wall time maps to UTC instants.

    normal: `first` is its only instant. ambiguous: `first` (fold=0) and `second` (fold=1). gap: `first` is
    the transition that ends the gap. For ambiguous and gap wall times, [region_start, region_end) is the
    range of wall times that are ambiguous / missing around the same transition.
    """

    kind: str
    first: datetime
    second: datetime
    region_start: datetime
    region_end: datetime


@dataclass(frozen=True)
class _CronPart:
    """One Quartz expression in zone `tz`; value fields are sorted tuples, None days mean no restriction."""

    text: str
    tz: tzinfo
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: tuple[int, ...]
    years: tuple[int, ...]
    day_of_month: _DayOfMonth | None
    day_of_week: _DayOfWeek | None

    @property
    def hourly(self) -> bool:
        """Fires in every hour of the day: gap wall times are skipped and overlaps fire twice."""
        return len(self.hours) == 24

    # --- public ----------------------------------------------------------------------------------------

    def next_after(self, t: datetime) -> datetime | None:
        """Walk wall times after t's; plus, if t is in the first pass of a repeated hour, its second pass."""
        local = t.astimezone(self.tz)
        wall = local.replace(tzinfo=None, fold=0, microsecond=0)
        if wall.year > MAX_YEAR:
            return None
        best: datetime | None = None
        if self.hourly and local.fold == 0:
            best = self._second_occurrence_in_overlap(wall)
        found = self._first_fire_from(self._next_wall(wall + _ONE_SECOND), t)
        if best is None or (found is not None and found < best):
            return found
        return best

    def last_at_or_before(self, t: datetime) -> datetime | None:
        """Walk wall times down from t's; if t is in the second pass of a repeated hour, the whole first
        pass (even wall times later than t's) is already past."""
        local = t.astimezone(self.tz)
        wall = local.replace(tzinfo=None, fold=0, microsecond=0)
        if wall.year < MIN_YEAR:
            return None
        start = wall
        here = _classify(wall, self.tz) if local.fold == 1 else None
        if here is not None and here.kind == _AMBIGUOUS:
            if self.hourly:
                candidate = self._prev_wall(wall)
                if candidate is not None and candidate >= here.region_start:
                    return _classify(candidate, self.tz).second
            start = here.region_end - _ONE_SECOND
        return self._last_fire_from(self._prev_wall(start), t)

    def describe(self) -> str:
        return _describe_cron(self)

    # --- helpers ---------------------------------------------------------------------------------------

    def _second_occurrence_in_overlap(self, wall: datetime) -> datetime | None:
        """If `wall` is the first occurrence of a repeated wall time, the earliest fold=1 fire of the overlap.

        Those instants come after the transition although their wall times are not after `wall`.
        """
        here = _classify(wall, self.tz)
        if here.kind != _AMBIGUOUS:
            return None
        candidate = self._next_wall(here.region_start)
        if candidate is None or candidate >= here.region_end:
            return None
        return _classify(candidate, self.tz).second

    def _first_fire_from(self, wall: datetime | None, t: datetime) -> datetime | None:
        """The first fire after `t`, walking matching wall times upwards from `wall` (the first after t's)."""
        while wall is not None:
            info = _classify(wall, self.tz)
            if info.kind == _GAP:
                if not self.hourly:
                    return info.first
                wall = self._next_wall(info.region_end)
                continue
            if info.first > t:
                return info.first
            if info.kind == _AMBIGUOUS and self.hourly and info.second > t:
                return info.second
            # t is the second occurrence of a repeated hour: its first occurrences are already past.
            wall = self._next_wall(info.region_end if info.kind == _AMBIGUOUS else wall + _ONE_SECOND)
        return None

    def _last_fire_from(self, wall: datetime | None, t: datetime) -> datetime | None:
        """The last fire at or before `t`, walking matching wall times downwards from `wall`."""
        while wall is not None:
            info = _classify(wall, self.tz)
            if info.kind == _GAP:
                if not self.hourly:
                    return info.first
                wall = self._prev_wall(info.region_start - _ONE_SECOND)
                continue
            if info.kind == _AMBIGUOUS and self.hourly and info.second <= t:
                return info.second
            if info.first <= t:
                return info.first
            wall = self._prev_wall(wall - _ONE_SECOND)
        return None

    def _next_wall(self, start: datetime) -> datetime | None:
        """The first matching local wall time >= `start` (naive, whole seconds)."""
        return self._search(start, forward=True)

    def _prev_wall(self, start: datetime) -> datetime | None:
        """The last matching local wall time <= `start` (naive, whole seconds)."""
        return self._search(start, forward=False)

    def _search(self, start: datetime, forward: bool) -> datetime | None:
        bound = (start.year, start.month, start.day, start.hour, start.minute, start.second)
        found = self._search_level((), bound, True, forward)
        if found is None:
            return None
        year, month, day, hour, minute, second = found
        return datetime(year, month, day, hour, minute, second)

    def _search_level(
        self, prefix: tuple[int, ...], bound: tuple[int, ...], bounded: bool, forward: bool,
    ) -> tuple[int, ...] | None:
        """Depth-first over year, month, day, hour, minute, second; `bounded` while prefix equals bound's."""
        level = len(prefix)
        if level == 6:
            return prefix
        limit = bound[level] if bounded else None
        for value in _ordered(self._values(prefix), limit, forward):
            found = self._search_level((*prefix, value), bound, bounded and value == limit, forward)
            if found is not None:
                return found
        return None

    def _values(self, prefix: tuple[int, ...]) -> Sequence[int]:
        level = len(prefix)
        if level == 0:
            return self.years
        if level == 1:
            return self.months
        if level == 2:
            return self._days(prefix[0], prefix[1])
        return (self.hours, self.minutes, self.seconds)[level - 3]

    def _days(self, year: int, month: int) -> Sequence[int]:
        length = calendar.monthrange(year, month)[1]
        if self.day_of_month is not None:
            return sorted(self.day_of_month.matching(year, month, length))
        if self.day_of_week is not None:
            return sorted(self.day_of_week.matching(year, month, length))
        return range(1, length + 1)


def _ordered(values: Sequence[int], limit: int | None, forward: bool) -> Sequence[int]:
    """`values` (sorted) from `limit` on: ascending >= limit, or descending <= limit."""
    if forward:
        return values if limit is None else values[bisect_left(values, limit):]
    if limit is None:
        return values[::-1]
    return values[:bisect_right(values, limit)][::-1]


def _classify(wall: datetime, tz: tzinfo) -> _WallTime:
    """Map naive local `wall` to its instant(s) in zone `tz` (see _WallTime)."""
    earlier = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    later = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if earlier == later:
        return _WallTime(_NORMAL, earlier, earlier, wall, wall)
    # PEP 495: fold=0 uses the offset in force before the transition. In an overlap that is the earlier
    # instant; in a gap it is the later one. Either way the transition lies between the two instants.
    low, high = min(earlier, later), max(earlier, later)
    transition = _transition_between(low, high, tz)
    offsets = (_offset(low, tz), _offset(high, tz))
    naive = transition.replace(tzinfo=None)
    region_start, region_end = naive + min(offsets), naive + max(offsets)
    if earlier < later:
        return _WallTime(_AMBIGUOUS, earlier, later, region_start, region_end)
    return _WallTime(_GAP, transition, transition, region_start, region_end)


def _offset(instant: datetime, tz: tzinfo) -> timedelta:
    offset = instant.astimezone(tz).utcoffset()
    if offset is None:
        raise ValueError(f"time zone {tz!r} gives no UTC offset")
    return offset


def _transition_between(low: datetime, high: datetime, tz: tzinfo) -> datetime:
    """The first whole-second instant in (low, high] whose UTC offset differs from low's (bisection)."""
    before = _offset(low, tz)
    low_s, high_s = int(low.timestamp()), int(high.timestamp())
    while high_s - low_s > 1:
        middle = (low_s + high_s) // 2
        if _offset(datetime.fromtimestamp(middle, UTC), tz) == before:
            low_s = middle
        else:
            high_s = middle
    return datetime.fromtimestamp(high_s, UTC)


# ---------------------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------------------

_FULL_MINUTES = tuple(range(60))


def _describe_cron(part: _CronPart) -> str:
    time = _describe_time(part)
    days = _describe_days(part)
    if time is None or days is None:
        return f"cron {' '.join(part.text.split())}{_zone_suffix(part.tz)}"
    periodic, phrase = time
    if days == "every day":
        days = "" if periodic else " every day"
    else:
        days = " " + days
    return f"{phrase}{days}{_describe_months_years(part)}{_zone_suffix(part.tz)}"


def _describe_time(part: _CronPart) -> tuple[bool, str] | None:
    """(periodic within the day, phrase) for the common shapes of second/minute/hour, else None."""
    seconds, minutes, hours = part.seconds, part.minutes, part.hours
    second_step = _regular_step(seconds, 60)
    minute_step = _regular_step(minutes, 60)
    hour_step = _regular_step(hours, 24)
    if minutes == _FULL_MINUTES and len(hours) == 24 and second_step is not None:
        return True, "every second" if second_step == 1 else f"every {second_step} seconds"
    if len(seconds) != 1:
        return None
    second = seconds[0]
    if len(hours) == 24 and minute_step is not None:
        every = "every minute" if minute_step == 1 else f"every {minute_step} minutes"
        return True, f"{every} at second {second}"
    if len(minutes) != 1:
        return None
    minute = minutes[0]
    if len(hours) <= 4:
        return False, "at " + _join([f"{hour:02d}:{minute:02d}:{second:02d}" for hour in hours])
    if hour_step is not None:
        every = "every hour" if hour_step == 1 else f"every {hour_step} hours"
        return True, f"{every} at minute {minute} second {second}"
    return None


def _regular_step(values: tuple[int, ...], span: int) -> int | None:
    """n if `values` is exactly 0, n, 2n ... covering the whole field evenly, else None."""
    if not values or values[0] != 0:
        return None
    step = values[1] if len(values) > 1 else span
    if span % step or values != tuple(range(0, span, step)):
        return None
    return step if step < span else None


def _describe_days(part: _CronPart) -> str | None:
    dom, dow = part.day_of_month, part.day_of_week
    if dom is None and dow is None:
        return "every day"
    if dow is not None and not dow.last_of and not dow.nth:
        if dow.days == frozenset(range(1, 8)):
            return "every day"
        return "on " + _join([_DAY_FULL_NAMES[day - 1] for day in sorted(dow.days)])
    if dom is not None and not dom.nearest_weekday and not dom.last_weekday and len(dom.before_last) <= 1:
        if dom.days == frozenset(range(1, 32)) and not dom.before_last:
            return "every day"
        if dom.before_last - {0}:
            return None
        names = [("day " if index == 0 else "") + str(day) for index, day in enumerate(sorted(dom.days))]
        if dom.before_last:
            names.append("the last day")
        return "on " + _join(names) + " of the month"
    return None


def _describe_months_years(part: _CronPart) -> str:
    text = ""
    if len(part.months) < 12:
        text += " in " + _join([calendar.month_name[month] for month in part.months])
    if len(part.years) < MAX_YEAR - MIN_YEAR + 1:
        years = part.years
        if len(years) > 1 and years == tuple(range(years[0], years[-1] + 1)):
            text += f" in {years[0]}-{years[-1]}"
        else:
            text += " in " + _join([str(year) for year in years])
    return text


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _zone_suffix(tz: tzinfo) -> str:
    name = str(getattr(tz, "key", None) or tz)
    return "" if name in ("UTC", "Etc/UTC", "UTC+00:00") else f" ({name})"


def _merge_for_description(parts: tuple[_Part, ...], text: str) -> _CronPart | None:
    """Several cron parts that differ only in their second, minute or hour field, merged into one.

    Used for the description only: merging hours could change the DST rule, so evaluation never merges.
    """
    crons = [part for part in parts if isinstance(part, _CronPart)]
    if len(parts) < 2 or len(crons) != len(parts):
        return None
    first = crons[0]
    for name in ("seconds", "minutes", "hours"):
        if all(_other_fields(cron, name) == _other_fields(first, name) for cron in crons):
            values = tuple(sorted({value for cron in crons for value in getattr(cron, name)}))
            if name == "seconds":
                return replace(first, text=text, seconds=values)
            if name == "minutes":
                return replace(first, text=text, minutes=values)
            return replace(first, text=text, hours=values)
    return None


def _other_fields(part: _CronPart, name: str) -> dict[str, object]:
    return {key: value for key, value in vars(part).items() if key not in (name, "text")}
