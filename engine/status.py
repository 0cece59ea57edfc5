"""`python run.py status`: jobs, schedules, next fire times, last runs, record counts, engine processes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from engine.metrics import oldest_due as metrics_oldest_due
from engine.settings import JOBS, Settings
from engine.store import Store


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


async def collect(settings: Settings, store: Store, built: set[str], now: datetime | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the `--json` output)."""
    now = now or datetime.now(UTC)
    last_runs = {r["job"]: r for r in await store.fetch("status_last_runs")}
    paused = {r["job"]: r for r in await store.fetch("paused_jobs")}
    oldest_due = {r["job"]: r["age"] for r in await metrics_oldest_due(store)}
    jobs = []
    for name in JOBS:
        schedule = settings.jobs[name].schedule
        last = last_runs.get(name)
        jobs.append({
            "job": name,
            "built": name in built,
            "paused": name in paused,
            "paused_by": paused[name]["changed_by"] if name in paused else None,
            "paused_at": _iso(paused[name]["updated_at"]) if name in paused else None,
            "schedule": schedule.text,
            "schedule_description": schedule.describe(),
            "next_fire_time": _iso(schedule.next_after(now)),
            "concurrency": settings.jobs[name].concurrency,
            "oldest_due_seconds": None if oldest_due.get(name) is None else round(oldest_due[name], 1),
            "last_run": None if last is None else {
                "fire_time": _iso(last["fire_time"]),
                "trigger": last["trigger"],
                "node": last["node"],
                "started_at": _iso(last["started_at"]),
                "finished_at": _iso(last["finished_at"]),
                "status": last["status"],
                "claimed": last["claimed"],
                "succeeded": last["succeeded"],
                "failed": last["failed"],
                "duration_seconds": (round((last["finished_at"] - last["started_at"]).total_seconds(), 3)
                                     if last["finished_at"] else None),
                "error": last["error"],
            },
        })
    counts: dict[str, dict[str, int]] = {}
    for row in await store.fetch("status_counts"):
        counts.setdefault(row["kind"], {})[row["status"]] = row["count"]
    attention = [{"reason": r["reason"], "status": r["status"], "count": r["count"]}
                 for r in await store.fetch("status_attention")]
    nodes = [{
        "name": r["name"], "live": r["live"], "started_at": _iso(r["started_at"]),
        "heartbeat_at": _iso(r["heartbeat_at"]), "stopped_at": _iso(r["stopped_at"]), "pid": r["pid"],
        "host": r["host"], "version": r["version"],
    } for r in await store.fetch("status_nodes", settings.node_lost_seconds)]
    ev = await store.fetchrow("events_status")
    events = {"backlog": ev["backlog"], "last_received_at": _iso(ev["last_received_at"]),
              "pending_installments": ev["pending_installments"]} if ev is not None else None
    return {"now": _iso(now), "jobs": jobs, "records": counts, "attention": attention, "events": events,
            "nodes": nodes}


def render_text(data: dict[str, Any]) -> str:
    """The human form of `collect`'s data."""
    lines = [f"drjobs status at {data['now']}", "", "JOBS"]
    header = f"  {'job':<38} {'schedule':<16} {'next fire (UTC)':<26} {'last run':<40}"
    lines.append(header)
    for job in data["jobs"]:
        last = job["last_run"]
        if last is None:
            last_text = "never"
        else:
            last_text = (f"{last['status']} {last['started_at'][:19]} on {last['node']} "
                         f"claimed={last['claimed']} ok={last['succeeded']} failed={last['failed']}")
            if last["duration_seconds"] is not None:
                last_text += f" {last['duration_seconds']}s"
        name = job["job"] + ("" if job["built"] else " (not built)") + (" (PAUSED)" if job["paused"] else "")
        lines.append(f"  {name:<38} {job['schedule']:<16} {(job['next_fire_time'] or 'never')[:25]:<26} {last_text}")
        due = job["oldest_due_seconds"]
        lines.append(f"  {'':<38} {job['schedule_description']}; "
                     + ("nothing due" if due is None else f"oldest due record waiting {_age(due)}"))
        if job["paused"]:
            lines.append(f"  {'':<38} paused by {job['paused_by']} at {job['paused_at'][:19]}")
    lines += ["", "RECORDS"]
    if not data["records"]:
        lines.append("  none")
    for kind, by_status in sorted(data["records"].items()):
        lines.append(f"  {kind:<26} " + "  ".join(f"{s}={n}" for s, n in sorted(by_status.items())))
    if data.get("attention"):
        lines += ["", "NEEDS AN OPERATOR"]
        for row in data["attention"]:
            lines.append(f"  installments {row['status']:<8} {row['reason']:<24} {row['count']:>8}  "
                         + ATTENTION.get(row["reason"], ""))
    events = data.get("events")
    if events is not None:
        lines += ["", "DIGITAL RIVER EVENTS",
                  f"  waiting to be applied {events['backlog']:>8}   last event heard "
                  f"{(events['last_received_at'] or 'never')[:19]}",
                  f"  installments Pending  {events['pending_installments']:>8}   (order made, payment not "
                  "confirmed by Digital River yet)"]
    lines += ["", "ENGINE PROCESSES (last day)"]
    if not data["nodes"]:
        lines.append("  none")
    for node in data["nodes"]:
        state = "live" if node["live"] else ("stopped" if node["stopped_at"] else "lost")
        lines.append(f"  {node['name']:<30} {state:<8} heartbeat {node['heartbeat_at'][:19]}  pid {node['pid']}")
    return "\n".join(lines)


ATTENTION = {
    "checkout_unknown": "Digital River does not know the record's checkout and no order was found; Open ones are "
                        "looked at again, Failed ones need a check in Digital River, then `retry installment ID`",
    "subscription_cancelled": "not charged: the subscription was Cancelled after the installment was made",
    "subscription_suspended": "not charged: the subscription is Suspended; `retry installment ID` once resumed",
}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def render_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)
