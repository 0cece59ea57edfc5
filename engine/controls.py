"""Operator controls: `pause JOB`, `resume JOB`, `retry KIND ID`.

Each command is written to `application_logs` (module `operator`) with who ran it, whatever APP_LOG_LEVEL is:
the operator's name is DRJOBS_OPERATOR when set, else the login name and host. The web console (engine/console)
calls the same functions with `who` naming itself and its client (`console client 127.0.0.1 session 1a2b3c4d`).
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

from engine.store import Store

# retry KIND → the named statement that retries one record of that kind.
RETRY_KINDS = {
    "installment": "retry_process_data",
    "fulfillment": "retry_fulfillment",
    "line-item": "retry_line_item_fulfillment",
}


def operator() -> str:
    name = os.environ.get("DRJOBS_OPERATOR")
    if name:
        return name[:200]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Outcome:
    ok: bool
    message: str


async def set_paused(store: Store, job: str, paused: bool, *, who: str | None = None) -> Outcome:
    """Pause or resume `job` on every engine process, audited as `who` (default: `operator()`)."""
    who = who or operator()
    await store.execute("set_job_paused", job, paused, who)
    verb = "paused" if paused else "resumed"
    await store.execute("audit_operator_action", f"{job} {verb} by {who}", None, store.node)
    return Outcome(True, f"{job} {verb}" + (": no engine process claims its records until `resume`" if paused else ""))


async def retry(store: Store, kind: str, record_id: int, *, who: str | None = None) -> Outcome:
    """Put one Failed record back to Open with its retry count reset, if the rules allow; audited as `who`
    (default: `operator()`)."""
    who = who or operator()
    row = await store.fetchrow(RETRY_KINDS[kind], record_id)
    if row is None:
        return Outcome(False, f"no {kind} record {record_id}")
    if row["retried"]:
        await store.execute("audit_operator_action", f"{kind} {record_id} retried by {who} (was Failed)",
                            str(record_id), store.node)
        return Outcome(True, f"{kind} {record_id} is Open again with its retry count reset")
    if row["claimed"]:
        reason = "it is claimed by an engine process right now; try again when its lease ends"
    elif row["dr_order_id"]:
        reason = f"it already has Digital River order {row['dr_order_id']}; retrying could charge twice"
    else:
        reason = f"it is {row['status']}, and only Failed records can be retried"
    await store.execute("audit_operator_action", f"{kind} {record_id} retry by {who} refused: {reason}",
                        str(record_id), store.node)
    return Outcome(False, f"refused: {kind} {record_id} was not retried: {reason}")
