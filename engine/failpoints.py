"""Crash points for the kill tests.

`failpoint("after_checkout_saved")` kills this process with SIGKILL when the name is listed in the
DRJOBS_FAILPOINTS environment variable (comma-separated), and does nothing otherwise. The crash tests start a
real engine process with one failpoint set and check, after a restart, that every record ends with exactly one
Digital River order. Production never sets the variable; an unset one costs a set lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(name.strip() for name in os.environ.get("DRJOBS_FAILPOINTS", "").split(",") if name.strip())


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
