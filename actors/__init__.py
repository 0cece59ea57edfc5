"""The job actors, one module per job of the contract."""

from __future__ import annotations

from actors.log_cleanup import LogCleanup
from engine.jobs import Job, Services

# The jobs this version implements, by contract name.
JOB_CLASSES: dict[str, type[Job]] = {
    LogCleanup.job_name: LogCleanup,
}


def build_jobs(services: Services) -> dict[str, Job]:
    """One actor per implemented job, in pipeline order."""
    return {name: cls(services) for name, cls in JOB_CLASSES.items()}
