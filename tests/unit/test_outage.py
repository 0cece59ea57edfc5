"""What counts as a database outage (`engine.store.is_outage`): waited out, never counted as a crash."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from engine.store import is_outage


def raised(make: Callable[[], None]) -> BaseException:
    try:
        make()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def test_connection_failures_and_restarts_are_outages() -> None:
    assert is_outage(ConnectionRefusedError("refused"))
    assert is_outage(TimeoutError())
    assert is_outage(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert is_outage(asyncpg.AdminShutdownError("terminating connection due to administrator command"))
    assert is_outage(asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"))


def test_a_statement_the_database_refuses_is_not_an_outage() -> None:
    assert not is_outage(asyncpg.InvalidTextRepresentationError("invalid input syntax for type json"))
    assert not is_outage(RuntimeError("a bug"))


def test_only_an_explicit_cause_makes_an_outage() -> None:
    def from_outage() -> None:
        raise RuntimeError("wrapped") from ConnectionRefusedError("refused")

    def while_handling_an_outage() -> None:
        try:
            raise ConnectionRefusedError("refused")
        except OSError:
            raise KeyError("a bug in the handler") from None

    def bug_during_handling() -> None:
        try:
            raise ConnectionRefusedError("refused")
        except OSError:
            {}["missing"]

    assert is_outage(raised(from_outage))
    assert not is_outage(raised(while_handling_an_outage))
    assert not is_outage(raised(bug_during_handling))
