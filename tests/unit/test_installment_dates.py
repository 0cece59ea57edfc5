"""Installment dates: counted from the anchor, month ends clamped, leap days, catch-up."""

from __future__ import annotations

from datetime import date

import pytest

from actors.subscription_installments import add_months, due_installments, next_installment_date


def test_month_end_anchor_keeps_the_31st_where_the_month_has_one() -> None:
    anchor = date(2026, 1, 31)
    dates, current = [], anchor
    for _ in range(5):
        current = next_installment_date(anchor, "Monthly", 1, current)
        dates.append(current)
    assert dates == [date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30), date(2026, 5, 31), date(2026, 6, 30)]


def test_leap_year_february_gets_the_29th() -> None:
    assert next_installment_date(date(2028, 1, 31), "Monthly", 1, date(2028, 1, 31)) == date(2028, 2, 29)
    assert next_installment_date(date(2028, 1, 30), "Monthly", 1, date(2028, 2, 1)) == date(2028, 2, 29)


def test_yearly_leap_day_anchor_falls_back_to_the_28th_in_common_years() -> None:
    anchor = date(2028, 2, 29)
    assert next_installment_date(anchor, "Yearly", 1, anchor) == date(2029, 2, 28)
    assert next_installment_date(anchor, "Yearly", 1, date(2031, 2, 28)) == date(2032, 2, 29)


@pytest.mark.parametrize(("frequency", "interval", "after", "expected"), [
    ("Daily", 1, date(2026, 12, 31), date(2027, 1, 1)),
    ("Daily", 3, date(2026, 1, 2), date(2026, 1, 4)),
    ("Weekly", 1, date(2026, 1, 1), date(2026, 1, 8)),
    ("Weekly", 2, date(2026, 1, 9), date(2026, 1, 15)),
    ("Monthly", 3, date(2026, 1, 1), date(2026, 4, 1)),
    ("Monthly", 1, date(2026, 12, 1), date(2027, 1, 1)),
    ("Yearly", 2, date(2026, 1, 1), date(2028, 1, 1)),
])
def test_each_frequency_and_interval(frequency: str, interval: int, after: date, expected: date) -> None:
    assert next_installment_date(date(2026, 1, 1), frequency, interval, after) == expected


def test_a_date_off_the_anchor_grid_moves_to_the_next_grid_date() -> None:
    assert next_installment_date(date(2026, 1, 31), "Monthly", 1, date(2026, 2, 15)) == date(2026, 2, 28)


def test_add_months_across_years_and_backwards() -> None:
    assert add_months(date(2026, 11, 30), 3) == date(2027, 2, 28)
    assert add_months(date(2026, 3, 31), -1) == date(2026, 2, 28)


def test_catch_up_makes_every_missed_installment_oldest_first() -> None:
    sub = {"installment_anchor_date": date(2026, 1, 31), "installment_frequency": "Monthly",
           "installment_interval": 1, "installment_next_run_date": date(2026, 2, 28), "installment_count": 1,
           "installment_count_remaining": 10}
    made, next_run = due_installments(sub, today=date(2026, 6, 1))  # type: ignore[arg-type]
    assert [(i.number, i.run_date) for i in made] == [
        (2, date(2026, 2, 28)), (3, date(2026, 3, 31)), (4, date(2026, 4, 30)), (5, date(2026, 5, 31))]
    assert next_run == date(2026, 6, 30)


def test_catch_up_stops_when_no_installments_remain_and_at_its_limit() -> None:
    sub = {"installment_anchor_date": date(2020, 1, 1), "installment_frequency": "Daily",
           "installment_interval": 1, "installment_next_run_date": date(2020, 1, 1), "installment_count": 0,
           "installment_count_remaining": 2}
    made, _ = due_installments(sub, today=date(2026, 1, 1))  # type: ignore[arg-type]
    assert len(made) == 2
    sub["installment_count_remaining"] = 10_000
    made, next_run = due_installments(sub, today=date(2026, 1, 1), limit=100)  # type: ignore[arg-type]
    assert len(made) == 100 and next_run == date(2020, 4, 10)


def test_nothing_is_due_before_the_run_date() -> None:
    sub = {"installment_anchor_date": None, "installment_frequency": "Weekly", "installment_interval": 1,
           "installment_next_run_date": date(2026, 5, 2), "installment_count": 0, "installment_count_remaining": 3}
    made, next_run = due_installments(sub, today=date(2026, 5, 1))  # type: ignore[arg-type]
    assert made == [] and next_run == date(2026, 5, 2)
