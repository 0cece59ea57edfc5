"""engine.cron against Quartz fire times worked out by hand from the calendar.

Every expected fire time below is written out literally (UTC), never computed by the code under test.
Calendar facts used: 2026-01-01 is a Thursday, 2026-11-21 a Saturday, 2027-01-01 a Friday; 2028 is a leap
year, 2026 and 2027 are not. DST in 2026: Europe/Berlin springs forward on 03-29 at 02:00 CET (01:00 UTC)
and falls back on 10-25 at 03:00 CEST (01:00 UTC); America/New_York springs forward on 03-08 at 02:00 EST
(07:00 UTC) and falls back on 11-01 at 02:00 EDT (06:00 UTC).
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from engine.cron import CronError, Schedule, parse_schedule

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # 30-minute DST shift


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def fires(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    """The next `count` fire times strictly after `start`."""
    result: list[datetime] = []
    t = start
    for _ in range(count):
        nxt = schedule.next_after(t)
        assert nxt is not None
        result.append(nxt)
        t = nxt
    return result


def next_of(text: str, start: datetime, count: int, tz: ZoneInfo | None = None) -> list[datetime]:
    return fires(parse_schedule(text) if tz is None else parse_schedule(text, tz), start, count)


# --- the seed's schedules -----------------------------------------------------------------------------------


def test_hourly_seed() -> None:
    schedule = parse_schedule("0 0 * * * ?")
    assert schedule.next_after(utc(2026, 11, 21, 10, 15)) == utc(2026, 11, 21, 11)
    assert schedule.next_after(utc(2026, 11, 21, 11)) == utc(2026, 11, 21, 12)  # strictly after
    assert schedule.last_at_or_before(utc(2026, 11, 21, 10, 59, 59)) == utc(2026, 11, 21, 10)
    assert schedule.last_at_or_before(utc(2026, 11, 21, 11)) == utc(2026, 11, 21, 11)  # exact hit
    assert fires(schedule, utc(2026, 12, 31, 22, 30), 3) == [
        utc(2026, 12, 31, 23), utc(2027, 1, 1, 0), utc(2027, 1, 1, 1)]
    assert schedule.describe() == "every hour at minute 0 second 0"


def test_daily_midnight_seed_with_question_mark_in_day_of_month_and_star_in_day_of_week() -> None:
    schedule = parse_schedule("0 0 0 ? * * *")
    assert fires(schedule, utc(2026, 11, 21), 3) == [utc(2026, 11, 22), utc(2026, 11, 23), utc(2026, 11, 24)]
    assert schedule.last_at_or_before(utc(2026, 11, 21, 23, 59, 59)) == utc(2026, 11, 21)
    assert schedule.last_at_or_before(utc(2026, 11, 21)) == utc(2026, 11, 21)
    assert schedule.describe() == "at 00:00:00 every day"


def test_salesforce_loop_of_twelve_expressions_equals_every_five_minutes() -> None:
    text = "; ".join(f"0 {minute} * * * ?" for minute in range(0, 60, 5))
    assert text.startswith("0 0 * * * ?; 0 5 * * * ?; 0 10 * * * ?") and text.endswith("; 0 55 * * * ?")
    loop = parse_schedule(text)
    every_five = parse_schedule("0 0/5 * * * ?")
    assert fires(loop, utc(2026, 11, 21, 23, 52), 4) == [
        utc(2026, 11, 21, 23, 55), utc(2026, 11, 22, 0, 0), utc(2026, 11, 22, 0, 5), utc(2026, 11, 22, 0, 10)]
    start = utc(2026, 11, 21, 10, 2, 3)
    assert fires(loop, start, 300) == fires(every_five, start, 300)
    assert loop.last_at_or_before(utc(2026, 11, 21, 10, 4, 59)) == utc(2026, 11, 21, 10)
    assert loop.describe() == every_five.describe() == "every 5 minutes at second 0"
    assert loop.text == text


def test_union_tolerates_whitespace_and_deduplicates() -> None:
    schedule = parse_schedule("  0 30 6 * * ?;0 0 12 * * ?  ;  0 0 0/6 * * ? ")
    # 06:30 and 12:00 from the first two, 00:00 06:00 12:00 18:00 from the third; 12:00 only once.
    assert fires(schedule, utc(2026, 11, 21, 5), 6) == [
        utc(2026, 11, 21, 6), utc(2026, 11, 21, 6, 30), utc(2026, 11, 21, 12), utc(2026, 11, 21, 18),
        utc(2026, 11, 22, 0), utc(2026, 11, 22, 6)]
    assert schedule.last_at_or_before(utc(2026, 11, 21, 12)) == utc(2026, 11, 21, 12)
    assert schedule.last_at_or_before(utc(2026, 11, 21, 11, 59)) == utc(2026, 11, 21, 6, 30)


def test_union_of_cron_and_interval() -> None:
    schedule = parse_schedule("0 0 12 * * ?; every 1h")
    assert fires(schedule, utc(2026, 11, 21, 10, 30), 3) == [
        utc(2026, 11, 21, 11), utc(2026, 11, 21, 12), utc(2026, 11, 21, 13)]


# --- steps, lists, ranges, names ----------------------------------------------------------------------------


def test_second_step_from_zero() -> None:
    assert next_of("0/5 * * * * ?", utc(2026, 11, 21, 12, 0, 3), 3) == [
        utc(2026, 11, 21, 12, 0, 5), utc(2026, 11, 21, 12, 0, 10), utc(2026, 11, 21, 12, 0, 15)]
    assert next_of("0/5 * * * * ?", utc(2026, 11, 21, 12, 0, 55), 1) == [utc(2026, 11, 21, 12, 1, 0)]


def test_star_step() -> None:
    assert next_of("0 */15 * * * ?", utc(2026, 11, 21, 12, 40), 4) == [
        utc(2026, 11, 21, 12, 45), utc(2026, 11, 21, 13), utc(2026, 11, 21, 13, 15), utc(2026, 11, 21, 13, 30)]


def test_value_step_runs_to_end_of_field() -> None:
    assert next_of("0 5/20 * * * ?", utc(2026, 11, 21, 12), 4) == [
        utc(2026, 11, 21, 12, 5), utc(2026, 11, 21, 12, 25), utc(2026, 11, 21, 12, 45), utc(2026, 11, 21, 13, 5)]


def test_range_step() -> None:
    assert next_of("0 10-40/10 * * * ?", utc(2026, 11, 21, 12, 10), 5) == [
        utc(2026, 11, 21, 12, 20), utc(2026, 11, 21, 12, 30), utc(2026, 11, 21, 12, 40),
        utc(2026, 11, 21, 13, 10), utc(2026, 11, 21, 13, 20)]


def test_lists_and_ranges() -> None:
    assert next_of("0 0 9,12,17 * * ?", utc(2026, 11, 21, 12), 3) == [
        utc(2026, 11, 21, 17), utc(2026, 11, 22, 9), utc(2026, 11, 22, 12)]
    assert next_of("0 0 9-11 * * ?", utc(2026, 11, 21, 10, 30), 3) == [
        utc(2026, 11, 21, 11), utc(2026, 11, 22, 9), utc(2026, 11, 22, 10)]
    assert next_of("0 0,30 8-9 * * ?", utc(2026, 11, 21), 5) == [
        utc(2026, 11, 21, 8), utc(2026, 11, 21, 8, 30), utc(2026, 11, 21, 9), utc(2026, 11, 21, 9, 30),
        utc(2026, 11, 22, 8)]


def test_month_and_day_names_are_case_insensitive() -> None:
    # Weekdays in January and July: 2027-01-01 is a Friday, 01-04 the next Monday.
    assert next_of("0 0 12 ? jan,JUL Mon-fri", utc(2026, 11, 21), 3) == [
        utc(2027, 1, 1, 12), utc(2027, 1, 4, 12), utc(2027, 1, 5, 12)]
    assert next_of("0 0 0 1 JAN,jul ?", utc(2026, 11, 21), 2) == [utc(2027, 1, 1), utc(2027, 7, 1)]
    assert next_of("0 0 0 1 3-MAY ?", utc(2026, 3, 1), 2) == [utc(2026, 4, 1), utc(2026, 5, 1)]


def test_day_of_week_is_numbered_1_to_7_from_sunday() -> None:
    saturday = utc(2026, 11, 21)
    assert next_of("0 0 12 ? * 2", saturday, 3) == [utc(2026, 11, 23, 12), utc(2026, 11, 30, 12), utc(2026, 12, 7, 12)]
    assert next_of("0 0 12 ? * 1", saturday, 1) == [utc(2026, 11, 22, 12)]  # Sunday
    assert next_of("0 0 12 ? * 7", saturday, 2) == [utc(2026, 11, 21, 12), utc(2026, 11, 28, 12)]  # Saturday
    assert next_of("0 0 12 ? * SUN", saturday, 1) == [utc(2026, 11, 22, 12)]
    assert next_of("0 0 12 ? * 2-6", saturday, 2) == [utc(2026, 11, 23, 12), utc(2026, 11, 24, 12)]
    assert next_of("0 0 12 ? * 1/3", saturday, 3) == [  # 1/3 = SUN, WED, SAT
        utc(2026, 11, 21, 12), utc(2026, 11, 22, 12), utc(2026, 11, 25, 12)]


def test_star_in_day_of_month_with_question_mark_fires_every_day() -> None:
    assert next_of("0 0 0 * * ?", utc(2026, 2, 27), 3) == [utc(2026, 2, 28), utc(2026, 3, 1), utc(2026, 3, 2)]
    # Both '*' is not Quartz, but unambiguous: accepted as every day.
    assert next_of("0 0 0 * * *", utc(2026, 2, 27), 2) == [utc(2026, 2, 28), utc(2026, 3, 1)]


def test_wrap_around_ranges() -> None:
    assert next_of("0 0 22-2 * * ?", utc(2026, 11, 21, 3), 6) == [
        utc(2026, 11, 21, 22), utc(2026, 11, 21, 23), utc(2026, 11, 22, 0), utc(2026, 11, 22, 1),
        utc(2026, 11, 22, 2), utc(2026, 11, 22, 22)]
    assert next_of("0 0 22-2/2 * * ?", utc(2026, 11, 21, 3), 4) == [
        utc(2026, 11, 21, 22), utc(2026, 11, 22, 0), utc(2026, 11, 22, 2), utc(2026, 11, 22, 22)]
    # Wednesday 2026-11-18: Fri 20, Sat 21, Sun 22, Mon 23, then Fri 27.
    assert next_of("0 0 0 ? * FRI-MON", utc(2026, 11, 18), 5) == [
        utc(2026, 11, 20), utc(2026, 11, 21), utc(2026, 11, 22), utc(2026, 11, 23), utc(2026, 11, 27)]
    assert next_of("0 30-10 * * * ?", utc(2026, 11, 21, 12, 9), 3) == [
        utc(2026, 11, 21, 12, 10), utc(2026, 11, 21, 12, 30), utc(2026, 11, 21, 12, 31)]
    assert parse_schedule("0 30-10 * * * ?").last_at_or_before(utc(2026, 11, 21, 12, 29)) == utc(2026, 11, 21, 12, 10)
    assert next_of("0 0 0 1 NOV-FEB ?", utc(2026, 11, 21), 4) == [
        utc(2026, 12, 1), utc(2027, 1, 1), utc(2027, 2, 1), utc(2027, 11, 1)]
    assert next_of("0 0 0 30-2 * ?", utc(2026, 2, 1), 4) == [  # February has no 30th or 31st
        utc(2026, 2, 2), utc(2026, 3, 1), utc(2026, 3, 2), utc(2026, 3, 30)]


# --- day-of-month and day-of-week specials ------------------------------------------------------------------


def test_last_day_of_month() -> None:
    assert next_of("0 0 0 L * ?", utc(2026, 1, 15), 4) == [
        utc(2026, 1, 31), utc(2026, 2, 28), utc(2026, 3, 31), utc(2026, 4, 30)]
    assert next_of("0 0 0 L * ?", utc(2028, 2, 1), 1) == [utc(2028, 2, 29)]


def test_days_before_last_day_of_month() -> None:
    assert next_of("0 0 0 L-2 * ?", utc(2026, 1, 1), 3) == [utc(2026, 1, 29), utc(2026, 2, 26), utc(2026, 3, 29)]


def test_nearest_weekday() -> None:
    # The 15th: Thu 2026-01-15; Sun 02-15 -> Mon 16th; Sat 08-15 -> Fri 14th; Sun 11-15 -> Mon 16th.
    assert next_of("0 0 0 15W * ?", utc(2026, 1, 1), 3) == [utc(2026, 1, 15), utc(2026, 2, 16), utc(2026, 3, 16)]
    assert next_of("0 0 0 15W * ?", utc(2026, 8, 1), 1) == [utc(2026, 8, 14)]
    assert next_of("0 0 0 15W * ?", utc(2026, 11, 1), 1) == [utc(2026, 11, 16)]
    # Saturday 2026-08-01 does not move back into July: Monday the 3rd.
    assert next_of("0 0 0 1W * ?", utc(2026, 7, 15), 1) == [utc(2026, 8, 3)]
    # 31W: Sat 01-31 -> Fri 30th; Tue 03-31; Sun 05-31 -> Fri 29th; months without a 31st are skipped.
    assert next_of("0 0 0 31W * ?", utc(2026, 1, 1), 3) == [utc(2026, 1, 30), utc(2026, 3, 31), utc(2026, 5, 29)]


def test_last_weekday_of_month() -> None:
    # Sat 2026-01-31 -> Fri 30th; Sat 02-28 -> Fri 27th; Tue 03-31; Thu 04-30; Sun 05-31 -> Fri 29th.
    assert next_of("0 0 0 LW * ?", utc(2026, 1, 1), 5) == [
        utc(2026, 1, 30), utc(2026, 2, 27), utc(2026, 3, 31), utc(2026, 4, 30), utc(2026, 5, 29)]


def test_last_given_weekday_of_month() -> None:
    # Last Fridays of 2026: Jan 30, Feb 27, Mar 27.
    assert next_of("0 0 0 ? * 6L", utc(2026, 1, 1), 3) == [utc(2026, 1, 30), utc(2026, 2, 27), utc(2026, 3, 27)]
    assert next_of("0 0 0 ? * FRIL", utc(2026, 1, 1), 1) == [utc(2026, 1, 30)]


def test_l_alone_in_day_of_week_is_saturday() -> None:
    assert next_of("0 0 0 ? * L", utc(2026, 11, 18), 2) == [utc(2026, 11, 21), utc(2026, 11, 28)]


def test_nth_weekday_of_month() -> None:
    # First Mondays: 2026-01-05, 02-02, 03-02.
    assert next_of("0 0 0 ? * 2#1", utc(2026, 1, 1), 3) == [utc(2026, 1, 5), utc(2026, 2, 2), utc(2026, 3, 2)]
    assert next_of("0 0 0 ? * MON#1", utc(2026, 1, 1), 1) == [utc(2026, 1, 5)]
    # Fifth Thursdays: Jan 29, then none in Feb or Mar (four each), then Apr 30.
    assert next_of("0 0 0 ? * 5#5", utc(2026, 1, 1), 2) == [utc(2026, 1, 29), utc(2026, 4, 30)]


# --- year field, month and year boundaries --------------------------------------------------------------------


def test_year_field() -> None:
    schedule = parse_schedule("0 0 0 1 1 ? 2030")
    assert schedule.next_after(utc(2026, 11, 21)) == utc(2030, 1, 1)
    assert schedule.next_after(utc(2030, 1, 1)) is None
    assert schedule.last_at_or_before(utc(2029, 12, 31, 23, 59, 59)) is None
    assert schedule.last_at_or_before(utc(2030, 1, 1)) == utc(2030, 1, 1)
    assert schedule.last_at_or_before(utc(2041, 6, 1)) == utc(2030, 1, 1)
    assert next_of("0 0 0 1 1 ? 2027,2029", utc(2026, 11, 21), 2) == [utc(2027, 1, 1), utc(2029, 1, 1)]
    assert next_of("0 0 0 1 1 ? 2027-2028", utc(2026, 11, 21), 2) == [utc(2027, 1, 1), utc(2028, 1, 1)]
    assert next_of("0 0 0 1 1 ? */100", utc(2026, 11, 21), 2) == [utc(2070, 1, 1), utc(2170, 1, 1)]


def test_far_and_yearly_expressions_answer_in_milliseconds() -> None:
    cases: list[tuple[str, ZoneInfo | None, datetime | None, datetime | None]] = [
        ("0 0 0 1 1 ? 2099", None, utc(2099, 1, 1), None),
        ("0 0 0 1 1 ?", BERLIN, utc(2026, 12, 31, 23), utc(2025, 12, 31, 23)),  # midnight CET = 23:00 UTC
        ("0 0 0 29 2 ?", None, utc(2028, 2, 29), utc(2024, 2, 29)),
        ("0 0 0 30 2 ?", None, None, None),  # never fires: both directions scan every year 1970-2199
    ]
    for text, tz, expected_next, expected_last in cases:
        schedule = parse_schedule(text) if tz is None else parse_schedule(text, tz)
        started = time.perf_counter()
        answers = (schedule.next_after(utc(2026, 11, 21)), schedule.last_at_or_before(utc(2026, 11, 21)))
        elapsed = time.perf_counter() - started
        assert answers == (expected_next, expected_last), text
        assert elapsed < 0.05, f"{text} took {elapsed:.3f}s"


def test_end_of_year_rollover() -> None:
    assert next_of("* * * * * ?", utc(2026, 12, 31, 23, 59, 59), 2) == [utc(2027, 1, 1), utc(2027, 1, 1, 0, 0, 1)]
    assert next_of("0 0 0 1 1 ?", utc(2026, 12, 31, 23, 59, 59), 1) == [utc(2027, 1, 1)]
    assert parse_schedule("59 59 23 31 12 ?").last_at_or_before(utc(2027, 1, 1)) == utc(2026, 12, 31, 23, 59, 59)


def test_february_29th() -> None:
    schedule = parse_schedule("0 0 0 29 2 ?")
    assert fires(schedule, utc(2026, 1, 1), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]
    assert schedule.last_at_or_before(utc(2026, 6, 1)) == utc(2024, 2, 29)


def test_31st_skips_short_months() -> None:
    assert next_of("0 0 0 31 * ?", utc(2026, 1, 31), 6) == [
        utc(2026, 3, 31), utc(2026, 5, 31), utc(2026, 7, 31), utc(2026, 8, 31), utc(2026, 10, 31), utc(2026, 12, 31)]


def test_impossible_date_never_fires() -> None:
    schedule = parse_schedule("0 0 0 30 2 ?")
    assert schedule.next_after(utc(2026, 1, 1)) is None
    assert schedule.last_at_or_before(utc(2026, 1, 1)) is None


def test_sub_second_inputs() -> None:
    schedule = parse_schedule("* * * * * ?")
    assert schedule.next_after(utc(2026, 11, 21, 12, 0, 0, 500_000)) == utc(2026, 11, 21, 12, 0, 1)
    assert schedule.last_at_or_before(utc(2026, 11, 21, 12, 0, 0, 500_000)) == utc(2026, 11, 21, 12)
    assert schedule.last_at_or_before(utc(2026, 11, 21, 12, 0, 0, 999_999)) == utc(2026, 11, 21, 12)


# --- time zones and DST -----------------------------------------------------------------------------------------


def test_fixed_offset_zone_and_utc_results() -> None:
    schedule = parse_schedule("0 0 9 * * ?", KOLKATA)  # +05:30
    nxt = schedule.next_after(utc(2026, 11, 21, 12))
    assert nxt == utc(2026, 11, 22, 3, 30)
    assert nxt is not None and nxt.utcoffset() == timedelta(0)
    # Input in another zone is the same instant.
    assert schedule.next_after(datetime(2026, 11, 21, 7, 0, tzinfo=BERLIN)) == utc(2026, 11, 22, 3, 30)
    assert schedule.describe() == "at 09:00:00 every day (Asia/Kolkata)"


def test_berlin_daily_0230_across_both_transitions() -> None:
    schedule = parse_schedule("0 30 2 * * ?", BERLIN)
    # 02:30 CET = 01:30 UTC; on 03-29 02:30 does not exist: fires at 03:00 CEST = 01:00 UTC; then 02:30 CEST.
    assert fires(schedule, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]
    # On 10-25 02:30 happens twice (CEST 00:30 UTC, CET 01:30 UTC): fires once, at the first.
    assert fires(schedule, utc(2026, 10, 23, 12), 3) == [
        utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert schedule.last_at_or_before(utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)
    assert schedule.last_at_or_before(utc(2026, 3, 29, 1)) == utc(2026, 3, 29, 1)  # exact hit on the shifted fire
    assert schedule.last_at_or_before(utc(2026, 3, 29, 0, 59, 59)) == utc(2026, 3, 28, 1, 30)


def test_berlin_every_30_minutes_across_both_transitions() -> None:
    schedule = parse_schedule("0 0/30 * * * ?", BERLIN)
    # Spring: 01:30 CET, then 02:00 and 02:30 do not exist, then 03:00 CEST: still every 30 real minutes.
    assert fires(schedule, utc(2026, 3, 29, 0), 4) == [
        utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1), utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 2)]
    # Autumn: 02:00 and 02:30 CEST, then 02:00 and 02:30 CET again, then 03:00 CET.
    assert fires(schedule, utc(2026, 10, 24, 23, 30), 5) == [
        utc(2026, 10, 25, 0), utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1), utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2)]
    assert schedule.last_at_or_before(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 25, 1)
    assert schedule.last_at_or_before(utc(2026, 10, 25, 0, 50)) == utc(2026, 10, 25, 0, 30)


def test_new_york_daily_0230_and_0130_across_both_transitions() -> None:
    schedule = parse_schedule("0 30 2 * * ?", NEW_YORK)
    # 02:30 EST = 07:30 UTC; 03-08 02:30 does not exist: 03:00 EDT = 07:00 UTC; then 02:30 EDT = 06:30 UTC.
    assert fires(schedule, utc(2026, 3, 6, 12), 3) == [
        utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]
    # 11-01: the repeated hour is 01:00-02:00, so 02:30 happens once (EST, 07:30 UTC).
    assert fires(schedule, utc(2026, 10, 31, 0), 3) == [
        utc(2026, 10, 31, 6, 30), utc(2026, 11, 1, 7, 30), utc(2026, 11, 2, 7, 30)]
    at_0130 = parse_schedule("0 30 1 * * ?", NEW_YORK)
    # 01:30 on 11-01 happens at 05:30 UTC (EDT) and 06:30 UTC (EST): fires once, at the first.
    assert fires(at_0130, utc(2026, 10, 31, 12), 2) == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    assert at_0130.last_at_or_before(utc(2026, 11, 1, 6, 45)) == utc(2026, 11, 1, 5, 30)
    assert at_0130.next_after(utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 2, 6, 30)


def test_new_york_every_30_minutes_across_both_transitions() -> None:
    schedule = parse_schedule("0 0/30 * * * ?", NEW_YORK)
    # 01:30 EST, then 02:00 and 02:30 do not exist, then 03:00 EDT, 03:30 EDT.
    assert fires(schedule, utc(2026, 3, 8, 6), 3) == [
        utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 30)]
    # 01:00 EDT, 01:30 EDT, 01:00 EST, 01:30 EST, 02:00 EST.
    assert fires(schedule, utc(2026, 11, 1, 4, 30), 5) == [
        utc(2026, 11, 1, 5), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6), utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 7)]
    assert schedule.last_at_or_before(utc(2026, 11, 1, 6, 29, 59)) == utc(2026, 11, 1, 6)


def test_hourly_schedule_in_second_occurrence_of_repeated_hour() -> None:
    schedule = parse_schedule("0 30 * * * ?", BERLIN)
    # At 02:10 CET (01:10 UTC) the latest fire is 02:30 CEST (00:30 UTC), a wall time *after* 02:10.
    assert schedule.last_at_or_before(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 25, 0, 30)
    assert schedule.next_after(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 1, 30)
    assert schedule.next_after(utc(2026, 10, 25, 1, 30)) == utc(2026, 10, 25, 2, 30)


def test_fixed_hour_schedule_with_several_times_in_the_gap_fires_once_after_it() -> None:
    schedule = parse_schedule("0 0/20 2 * * ?", BERLIN)  # 02:00, 02:20, 02:40 local
    assert fires(schedule, utc(2026, 3, 28, 12), 4) == [
        utc(2026, 3, 29, 1), utc(2026, 3, 30, 0), utc(2026, 3, 30, 0, 20), utc(2026, 3, 30, 0, 40)]
    # In the repeated hour only the first (CEST) occurrences fire.
    assert fires(schedule, utc(2026, 10, 24, 12), 4) == [
        utc(2026, 10, 25, 0), utc(2026, 10, 25, 0, 20), utc(2026, 10, 25, 0, 40), utc(2026, 10, 26, 1)]


def test_every_30_minutes_in_berlin_is_exactly_1800_seconds_apart_all_year() -> None:
    schedule = parse_schedule("0 0/30 * * * ?", BERLIN)
    times = fires(schedule, utc(2025, 12, 31, 23, 59), 365 * 48)
    assert times[0] == utc(2026, 1, 1) and times[-1] == utc(2026, 12, 31, 23, 30)
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(times))


def test_daily_0230_in_berlin_fires_once_per_local_day_all_year() -> None:
    schedule = parse_schedule("0 30 2 * * ?", BERLIN)
    times = fires(schedule, utc(2025, 12, 31, 12), 365)
    local_days = [t.astimezone(BERLIN).date() for t in times]
    assert local_days[0].isoformat() == "2026-01-01" and local_days[-1].isoformat() == "2026-12-31"
    assert len(set(local_days)) == 365


def test_half_hour_dst_zone() -> None:
    # Lord Howe (+10:30 standard, +11:00 summer) falls back on 2026-04-05 at 02:00 local (15:00 UTC on 04-04):
    # 01:30-02:00 happens twice. Springs forward on 2026-10-04 at 02:00 local (15:30 UTC on 10-03).
    hourly = parse_schedule("0 45 * * * ?", LORD_HOWE)
    # 01:45 (+11) = 14:45 UTC, 01:45 (+10:30) = 15:15 UTC, 02:45 (+10:30) = 16:15 UTC.
    assert fires(hourly, utc(2026, 4, 4, 14), 3) == [
        utc(2026, 4, 4, 14, 45), utc(2026, 4, 4, 15, 15), utc(2026, 4, 4, 16, 15)]
    daily = parse_schedule("0 15 2 * * ?", LORD_HOWE)
    # 02:15 on 10-04 does not exist (02:00 -> 02:30): fires at 02:30 (+11) = 15:30 UTC on 10-03.
    assert fires(daily, utc(2026, 10, 2, 12), 2) == [utc(2026, 10, 2, 15, 45), utc(2026, 10, 3, 15, 30)]


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_schedule("0 0 * * * ?").next_after(datetime(2026, 11, 21))
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_schedule("every 5m").last_at_or_before(datetime(2026, 11, 21))


# --- intervals and off ----------------------------------------------------------------------------------------


def test_every_30_seconds() -> None:
    schedule = parse_schedule("every 30s")
    assert fires(schedule, utc(2026, 11, 21, 12, 0, 10), 3) == [
        utc(2026, 11, 21, 12, 0, 30), utc(2026, 11, 21, 12, 1), utc(2026, 11, 21, 12, 1, 30)]
    assert schedule.last_at_or_before(utc(2026, 11, 21, 12, 0, 29, 999_999)) == utc(2026, 11, 21, 12)
    assert schedule.last_at_or_before(utc(2026, 11, 21, 12, 0, 30)) == utc(2026, 11, 21, 12, 0, 30)
    assert schedule.describe() == "every 30 seconds"


def test_every_5_minutes_is_aligned_to_the_epoch_in_any_zone() -> None:
    for tz in (UTC, BERLIN, KOLKATA):
        schedule = parse_schedule("every 5m", tz)
        assert fires(schedule, utc(2026, 11, 21, 12, 3, 20), 2) == [utc(2026, 11, 21, 12, 5), utc(2026, 11, 21, 12, 10)]
        assert schedule.last_at_or_before(utc(2026, 11, 21, 12, 3, 20)) == utc(2026, 11, 21, 12)
    assert parse_schedule("every 5m").describe() == "every 5 minutes"


def test_every_hour_90_seconds_and_days() -> None:
    assert next_of("every 1h", utc(2026, 11, 21, 12, 0, 0, 1), 2) == [utc(2026, 11, 21, 13), utc(2026, 11, 21, 14)]
    assert parse_schedule("every 1h").describe() == "every hour"
    # Midnight UTC is a multiple of 90 s (86400 = 960 * 90).
    assert next_of("every 90s", utc(2026, 11, 21), 3) == [
        utc(2026, 11, 21, 0, 1, 30), utc(2026, 11, 21, 0, 3), utc(2026, 11, 21, 0, 4, 30)]
    assert parse_schedule("every 90s").describe() == "every 90 seconds"
    # 2026-11-21 is day 20778 since the epoch (even), so 'every 2d' fires on it and two days later.
    every_two_days = parse_schedule("every 2d")
    assert every_two_days.last_at_or_before(utc(2026, 11, 21, 18)) == utc(2026, 11, 21)
    assert every_two_days.next_after(utc(2026, 11, 21)) == utc(2026, 11, 23)
    # The epoch was a Thursday: 'every 7d' fires on Thursdays at 00:00 UTC (2026-11-19 is day 20776 = 7 * 2968).
    assert parse_schedule("every 7d").last_at_or_before(utc(2026, 11, 21)) == utc(2026, 11, 19)
    assert parse_schedule("every 7d").describe() == "every 7 days"


def test_off() -> None:
    for text in ("off", " OFF "):
        schedule = parse_schedule(text)
        assert schedule.is_off
        assert schedule.text == text
        assert schedule.next_after(utc(2026, 11, 21)) is None
        assert schedule.last_at_or_before(utc(2026, 11, 21)) is None
        assert schedule.describe() == "off"
    assert not parse_schedule("every 5m").is_off
    assert not parse_schedule("0 0 * * * ?").is_off


def test_text_is_kept_verbatim() -> None:
    assert parse_schedule("  0 0  * * * ?").text == "  0 0  * * * ?"


# --- descriptions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "description"), [
    ("0 0/5 * * * ?", "every 5 minutes at second 0"),
    ("0 * * * * ?", "every minute at second 0"),
    ("* * * * * ?", "every second"),
    ("0/15 * * * * ?", "every 15 seconds"),
    ("0 0 0 ? * * *", "at 00:00:00 every day"),
    ("0 30 9,17 * * ?", "at 09:30:00 and 17:30:00 every day"),
    ("0 0 12 ? * 2", "at 12:00:00 on Monday"),
    ("0 0 12 ? * MON-FRI", "at 12:00:00 on Monday, Tuesday, Wednesday, Thursday and Friday"),
    ("0 0 0 L * ?", "at 00:00:00 on the last day of the month"),
    ("0 0 0 1,15 * ?", "at 00:00:00 on day 1 and 15 of the month"),
    ("0 0 0 1 1 ? 2030", "at 00:00:00 on day 1 of the month in January in 2030"),
    ("0 0 0/6 * * ?", "at 00:00:00, 06:00:00, 12:00:00 and 18:00:00 every day"),
    ("0 0 0/3 * * ?", "every 3 hours at minute 0 second 0"),
    ("0 0 12 ? * 6L", "cron 0 0 12 ? * 6L"),
    ("0 0/5 9-17 * * ?", "cron 0 0/5 9-17 * * ?"),
])
def test_describe(text: str, description: str) -> None:
    assert parse_schedule(text).describe() == description


def test_describe_union_that_cannot_be_merged() -> None:
    assert parse_schedule("0 0 12 ? * 2; every 30s").describe() == "at 12:00:00 on Monday; every 30 seconds"


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty schedule"),
    ("   ", "empty schedule"),
    ("0 0 * * *", "expected 6 or 7 fields"),
    ("0 0 0 * * ? 2030 x", "got 8"),
    ("0 0 25 * * ?", "bad cron field 'hour' in '0 0 25 .*': 25 is out of range 0-23"),
    ("60 0 0 * * ?", "'second'.*60 is out of range 0-59"),
    ("0 0 0 32 * ?", "'day-of-month'.*32 is out of range 1-31"),
    ("0 0 0 ? 13 *", "'month'.*13 is out of range 1-12 or JAN-DEC"),
    ("0 0 0 ? * 0", "'day-of-week'.*0 is out of range 1-7"),
    ("0 0 0 1 1 ? 1969", "'year'.*1969 is out of range 1970-2199"),
    ("0 0 0 ? * ?", "'\\?' cannot be in both day-of-month and day-of-week"),
    ("0 ? * * * ?", "bad cron field 'minute'.*'\\?' is only allowed in day-of-month or day-of-week"),
    ("0 0 0 1 * MON", "both restrict days"),
    ("every 0s", "interval must be at least 1s"),
    ("every 5x", "unit 'x' is not one of s, m, h, d"),
    ("every s", "not a whole number"),
    ("every", "bad interval"),
    ("0 L * * * ?", "bad cron field 'minute'.*'L' and 'W' are only allowed in day-of-month or day-of-week"),
    ("0 0 0 ? L *", "bad cron field 'month'.*'L' and 'W'"),
    ("0 0 15W * * ?", "bad cron field 'hour'.*'L' and 'W'"),
    ("0 0 0 ? * 15W", "bad cron field 'day-of-week'.*'W' and 'L-n' belong in day-of-month"),
    ("0 0 0 5L * ?", "bad cron field 'day-of-month'.*not allowed here"),
    ("0 0 0 1#2 * ?", "bad cron field 'day-of-month'.*'#' is only allowed in day-of-week"),
    ("0 0 0 ? * 2#6", "the k of n#k must be 1-5"),
    ("0 0/0 * * * ?", "bad cron field 'minute'.*step 0 must be at least 1"),
    ("0 */61 * * * ?", "step 61 is larger than the range 0-59"),
    ("0 0 0 1 1 ? 2030-2020", "year.*range '2030-2020' is backwards"),
    ("0 0 0 ? FOO *", "'month'.*'FOO' is not a valid value"),
    ("0 0,,5 * * * ?", "empty item in list"),
    ("0 0 * * * ?;", "empty expression #2"),
    ("off; 0 0 * * * ?", "'off' cannot be combined"),
    ("hourly", "expected 6 or 7 fields"),
])
def test_bad_input_raises_cron_error_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        parse_schedule(text)


def test_cron_error_is_a_value_error_with_a_complete_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_schedule("0 0 25 * * ?")
    assert isinstance(caught.value, CronError)
    assert str(caught.value) == "bad cron field 'hour' in '0 0 25 * * ?': 25 is out of range 0-23"


# --- properties -----------------------------------------------------------------------------------------------

PROPERTY_EXPRESSIONS = [
    "0 0 * * * ?",
    "0 0/5 * * * ?",
    "*/20 * * * * ?",
    "0 30 2 * * ?",
    "0 0/20 1-3 * * ?",
    "0 15 22-2 ? * FRI-MON",
    "0 0 0 L-2 * ?",
    "0 0 12 ? * 6L",
    "0 0 0 15W,LW * ?",
    "0 0 8 ? * 2#1,5#5",
    "0 0 * * * ?; 0 30 2 * * ?; every 90s",
]
# Start shortly before a DST transition (or a year end for UTC) so that it is crossed.
PROPERTY_STARTS = [
    (UTC, utc(2026, 12, 31, 20)),
    (BERLIN, utc(2026, 10, 24, 22)),
    (NEW_YORK, utc(2026, 3, 7, 23)),
    (LORD_HOWE, utc(2026, 10, 3, 12)),
]


@pytest.mark.parametrize("text", PROPERTY_EXPRESSIONS)
@pytest.mark.parametrize(("tz", "start"), PROPERTY_STARTS, ids=[str(tz) for tz, _ in PROPERTY_STARTS])
def test_fire_times_increase_and_round_trip(text: str, tz: ZoneInfo, start: datetime) -> None:
    schedule = parse_schedule(text, tz)
    previous: datetime | None = schedule.last_at_or_before(start)
    t = start
    for _ in range(500):
        nxt = schedule.next_after(t)
        assert nxt is not None and nxt > t
        assert nxt.tzinfo is UTC
        assert schedule.last_at_or_before(nxt) == nxt
        assert schedule.last_at_or_before(nxt - timedelta(microseconds=1)) == previous
        assert schedule.next_after(nxt - timedelta(microseconds=1)) == nxt
        previous = t = nxt
