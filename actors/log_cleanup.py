"""DCM Application Logs Cleanup Job: delete `application_logs` older than `APP_LOG_RETENTION_DAYS`.

Rows go in batches of `BATCH_SIZE`, each its own short transaction, so the cleanup never holds locks long
enough to stall the log writer or an operator's query.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from engine.jobs import Job, Run
from engine.logs import get_logger

log = get_logger(component="log_cleanup")


class LogCleanup(Job):
    job_name = "log-cleanup"
    due_table = "application_logs"
    batch_size = 1000

    def cutoff(self) -> datetime:
        return datetime.now(UTC) - timedelta(days=self.settings.app_log_retention_days)

    async def run_once(self, run: Run) -> None:
        cutoff = self.cutoff()
        while await self.may_claim():
            status = await self.store.execute("delete_old_application_logs", cutoff, self.batch_size)
            deleted = int(status.split()[-1])
            run.claimed += deleted
            run.succeeded += deleted
            if deleted < self.batch_size:
                break
        log.info("application_logs_deleted", deleted=run.succeeded, older_than=cutoff.isoformat())

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_old_application_logs", self.cutoff()))
