"""This process in `engine_nodes`: heartbeats, the live-node count, and runs left behind by dead processes.

Every `HEARTBEAT_SECONDS` (at most a third of NODE_LOST_SECONDS) the node refreshes its row. A node is live
while its heartbeat is younger than NODE_LOST_SECONDS (default 30); each storefront's Digital River rate budget is
split among the live nodes holding its key (`on_live_nodes`). Runs left `running` by a node that stopped
heartbeating (it was killed) are marked `failed`, so `status` tells the truth.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from engine.actor import Actor
from engine.logs import get_logger
from engine.settings import Settings
from engine.store import Store

log = get_logger(component="node")
HEARTBEAT_SECONDS = 5.0
# The waits before the first heartbeats after the one at start, then every HEARTBEAT_SECONDS.
STARTUP_BEATS = (0.5, 1.0, 2.0)
LOST_AFTER_SECONDS = 30.0


class NodeHeartbeat(Actor[None]):
    """Keeps this process's `engine_nodes` row fresh."""

    def __init__(self, store: Store, version: str, on_live_nodes: Callable[[dict[str, int], int], None] | None = None,
                 lost_after: float = LOST_AFTER_SECONDS, published: dict[str, Any] | None = None,
                 default_key_id: str | None = None) -> None:
        super().__init__("node")
        self.store = store
        self.version = version
        self.published = json.dumps(published or {})
        self.on_live_nodes = on_live_nodes
        self.interval = min(HEARTBEAT_SECONDS, lost_after / 3)
        self.lost_after = lost_after
        self.started_at = datetime.now(UTC)
        self.live_nodes = 1
        # DefaultStore's key_id: processes of a release before storefronts are counted as holding that key.
        self.default_key_id = default_key_id

    async def beat(self) -> None:
        """One heartbeat: refresh the row, count live nodes, fail runs of lost nodes."""
        await self.store.execute("node_heartbeat", self.store.node, os.getpid(), socket.gethostname(),
                                 self.version, self.published)
        self.live_nodes = max(1, int(await self.store.fetchval("live_node_count", self.lost_after)))
        if self.on_live_nodes:
            by_key = {row["key_id"]: int(row["live"]) for row in
                      await self.store.fetch("live_nodes_by_key", self.lost_after, self.default_key_id)}
            self.on_live_nodes(by_key, self.live_nodes)
        for row in await self.store.fetch("fail_runs_of_lost_nodes", self.lost_after, self.store.node,
                                          self.started_at):
            log.warning("job_run_abandoned", job=row["job"], run_id=row["id"], node=row["node"])

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self.beat()
        log.info("node_started", node=self.store.node, live_nodes=self.live_nodes)
        # Processes started together each see only themselves at their first beat, and would send their keys'
        # whole budgets until the next: so the first beats come quickly (issue 17's benchmark, two processes: a
        # first second of 350 requests at a 250/s key).
        waits = [w for w in STARTUP_BEATS if w < self.interval]
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=waits.pop(0) if waits else self.interval)
            except TimeoutError:
                await self.beat()

    async def on_stop(self) -> None:
        await self.store.execute("node_stopped", self.store.node)
        log.info("node_stopped", node=self.store.node)


def published_settings(settings: Settings, jobs: set[str],
                       storefronts: dict[str, dict[str, object]] | None = None) -> dict[str, Any]:
    """What this process tells `status` about itself in `engine_nodes.settings`: the jobs it runs with their
    schedules and concurrency, the zone schedules are read in, where it sends requests, and the storefronts it has a
    key for (label → key_id, URL, budget: `Storefronts.published`). Never a secret."""
    return {
        "storefronts": storefronts or {},
        "jobs": {name: {"schedule": job.schedule.text, "schedule_description": job.schedule.describe(),
                        "concurrency": job.concurrency}
                 for name, job in settings.jobs.items() if name in jobs},
        "schedule_time_zone": str(settings.schedule_time_zone),
        "dr_api_url": settings.dr_api_url,
        "dr_max_requests_per_second": settings.dr_max_requests_per_second,
        "lease_seconds": settings.lease_seconds,
    }
