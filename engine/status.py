"""`python run.py status`: jobs, schedules, next fire times, last runs, record counts, failure reasons, engine
processes. It only reads.

Schedules are the cluster's: each engine process publishes the jobs it runs with their schedules in
`engine_nodes.settings`, and `status` shows what the live ones report. Only with no live engine does it fall back
on the settings of the shell it runs in, and says so.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.cron import CronError, Schedule, parse_schedule
from engine.metrics import COUNT_EXACTLY_BELOW, record_counts, waiting_for_key
from engine.metrics import oldest_due as metrics_oldest_due
from engine.settings import DEFAULT_STOREFRONT, JOBS, Settings
from engine.store import Store

# Failure reasons shown per job.
TOP_FAILURES = 5


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


async def collect(settings: Settings, store: Store, built: set[str], now: datetime | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the `--json` output)."""
    now = now or datetime.now(UTC)
    last_runs = {r["job"]: r for r in await store.fetch("status_last_runs")}
    paused = {r["job"]: r for r in await store.fetch("paused_jobs")}
    oldest_due = {r["job"]: r["age"] for r in await metrics_oldest_due(store)}
    node_rows = await store.fetch("status_nodes", settings.node_lost_seconds)
    live_settings = [_settings(r["settings"]) for r in node_rows if r["live"]]
    failures: dict[str, list[dict[str, Any]]] = {}
    for row in await store.fetch("status_failures", TOP_FAILURES):
        failures.setdefault(row["job"], []).append(
            {"reason": row["reason"], "count": row["count"], "example": (row["example"] or "")[:200]})
    jobs = job_rows(settings, built, now, last_runs=last_runs, paused=paused, oldest_due=oldest_due,
                    live_settings=live_settings, failures=failures)
    counts: dict[str, dict[str, int]] = {}
    estimated: set[str] = set()
    for row in await record_counts(store):
        counts.setdefault(row["kind"], {})[row["status"]] = row["count"]
        if row["estimated"]:
            estimated.add(row["kind"])
    attention = [{"reason": r["reason"], "status": r["status"], "count": r["count"]}
                 for r in await store.fetch("status_attention")]
    nodes = [{
        "name": r["name"], "live": r["live"], "started_at": _iso(r["started_at"]),
        "heartbeat_at": _iso(r["heartbeat_at"]), "stopped_at": _iso(r["stopped_at"]), "pid": r["pid"],
        "host": r["host"], "version": r["version"], "settings": _settings(r["settings"]),
    } for r in node_rows]
    storefronts = await _storefronts(settings, store, live_settings)
    ev = await store.fetchrow("events_status")
    events = {"backlog": ev["backlog"], "last_received_at": _iso(ev["last_received_at"]),
              "pending_installments": ev["pending_installments"]} if ev is not None else None
    return {"now": _iso(now), "jobs": jobs, "records": counts, "records_estimated": sorted(estimated),
            "attention": attention, "events": events, "storefronts": storefronts,
            "nodes": nodes}


async def _storefronts(settings: Settings, store: Store, live_settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The storefronts with a key (those the live engines publish; with none live, this command's settings) and
    the records of every other storefront, which wait for a key untouched."""
    if live_settings:
        # A live engine of a release before storefronts publishes none: it has DefaultStore's key.
        keyed = sorted({label for published in live_settings
                        for label in (published.get("storefronts") or {DEFAULT_STOREFRONT: {}})})
        source = "live engines"
    elif settings.keyed_storefronts:
        keyed = [config.label for config in settings.keyed_storefronts]
        source = "this command's settings: no engine is live"
    else:
        # Nothing says which storefronts have a key: naming them all "waiting" would be a guess.
        return {"with_key": [], "key_source": "nowhere: no engine is live and this command has no key, so which "
                                              "storefronts wait for one is not known",
                "waiting_for_key": []}
    waiting: dict[str, dict[str, int]] = {}
    for row in await waiting_for_key(store, keyed, subscriptions=True):
        waiting.setdefault(row["label"], {})[row["kind"]] = row["count"]
    return {"with_key": keyed, "key_source": source,
            "waiting_for_key": [{"storefront": label, "records": records, "setting": key_setting(label)}
                                for label, records in sorted(waiting.items())]}


def key_setting(label: str) -> str:
    """The variable that gives the storefront `label` its key: DR_API_KEY for DefaultStore."""
    return "DR_API_KEY" if label == DEFAULT_STOREFRONT else f"DR_API_KEY_{label}"


def job_rows(settings: Settings, built: set[str], now: datetime, *, last_runs: dict[str, Any],
             paused: dict[str, Any], oldest_due: dict[str, float | None], live_settings: list[dict[str, Any]],
             failures: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per job as `status` shows it, from what was read: the latest run of each job (`status_last_runs`
    rows by job), the paused ones (`paused_jobs` rows by job), the oldest due ages, the settings live engines
    published, and the failure reasons. The console's Jobs page builds its rows here too, from cheaper reads."""
    jobs = []
    for name in JOBS:
        reported = _reported(name, live_settings)
        schedule: Schedule | None
        concurrency: int | None
        if reported:
            source = "engines"
            schedule_text, description, concurrency, schedule = reported[0]
        else:
            schedule = settings.jobs[name].schedule
            source = "no live engine runs it" if live_settings else "this shell (no live engine)"
            schedule_text, description = schedule.text, schedule.describe()
            concurrency = settings.jobs[name].concurrency
        last = last_runs.get(name)
        jobs.append({
            "job": name,
            "built": name in built,
            "paused": name in paused,
            "paused_by": paused[name]["changed_by"] if name in paused else None,
            "paused_at": _iso(paused[name]["updated_at"]) if name in paused else None,
            "schedule": schedule_text,
            "schedule_description": description,
            "schedule_source": source,
            # Live engines that disagree: each distinct (schedule, concurrency) they reported.
            "engine_schedules": [{"schedule": r[0], "concurrency": r[2]} for r in reported] if len(reported) > 1
            else [],
            "next_fire_time": _iso(schedule.next_after(now)) if schedule is not None else None,
            "concurrency": concurrency,
            "failures": failures.get(name, []),
            "oldest_due_seconds": None if (age := oldest_due.get(name)) is None else round(age, 1),
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
    return jobs


def _settings(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reported(job: str, live: list[dict[str, Any]]) -> list[tuple[str, str, int | None, Schedule | None]]:
    """The distinct (schedule, description, concurrency, parsed schedule) live engines report for `job`: schedules
    that fire before `off`, then the most common first."""
    seen: dict[tuple[str, str, int | None], list[Any]] = {}
    for node in live:
        job_settings = (node.get("jobs") or {}).get(job)
        if not isinstance(job_settings, dict) or not isinstance(job_settings.get("schedule"), str):
            continue
        key = (job_settings["schedule"], str(job_settings.get("schedule_description") or ""),
               job_settings.get("concurrency") if isinstance(job_settings.get("concurrency"), int) else None)
        entry = seen.setdefault(key, [0, _parsed(key[0], node.get("schedule_time_zone"))])
        entry[0] += 1
    # An engine with the job `off` does not run it: a schedule that fires is shown first, then the most common.
    ordered = sorted(seen.items(), key=lambda item: (item[0][0].strip().lower() == "off", -item[1][0]))
    return [(key[0], key[1], key[2], entry[1]) for key, entry in ordered]


def _parsed(text: str, zone: Any) -> Schedule | None:
    try:
        return parse_schedule(text, ZoneInfo(zone) if isinstance(zone, str) else ZoneInfo("UTC"))
    except (CronError, ZoneInfoNotFoundError, ValueError):
        return None


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
        source = "" if job["schedule_source"] == "engines" else f" [schedule of {job['schedule_source']}]"
        lines.append(f"  {'':<38} {job['schedule_description']}{source}; "
                     + ("nothing due" if due is None else f"oldest due record waiting {_age(due)}"))
        for other in job["engine_schedules"][1:]:
            lines.append(f"  {'':<38} other live engines run it on {other['schedule']!r}")
        if job["paused"]:
            lines.append(f"  {'':<38} paused by {job['paused_by']} at {job['paused_at'][:19]}")
    lines += ["", "RECORDS"]
    if not data["records"]:
        lines.append("  none")
    estimated = set(data.get("records_estimated") or [])
    for kind, by_status in sorted(data["records"].items()):
        about = "~" if kind in estimated else ""
        lines.append(f"  {kind:<26} " + "  ".join(f"{s}={about}{n}" for s, n in sorted(by_status.items())))
    if estimated:
        lines.append(f"  (~: estimated from the last ANALYZE, for tables of {COUNT_EXACTLY_BELOW:,} rows or more)")
    failing = [job for job in data["jobs"] if job.get("failures")]
    if failing:
        lines += ["", "WHY RECORDS FAILED (most common first)"]
        for job in failing:
            lines.append(f"  {job['job']}")
            for row in job["failures"]:
                lines.append(f"    {row['count']:>8}  {row['reason'] or 'no code'}: {row['example'][:90]}")
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
    storefronts = data.get("storefronts")
    if storefronts is not None:
        keyed = ", ".join(storefronts["with_key"]) or "none known"
        lines += ["", "STOREFRONTS", f"  with a key: {keyed} (from {storefronts['key_source']})"]
        for row in storefronts["waiting_for_key"]:
            counts = "  ".join(f"{kind}={count}" for kind, count in sorted(row["records"].items()))
            lines.append(f"  {row['storefront']:<26} waiting for a key: {counts}  (set {row['setting']})")
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
