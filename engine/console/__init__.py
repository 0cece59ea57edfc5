"""The operator console: server-side HTML pages at `/` on the engine's HTTP listener (HTTP_HOST:HTTP_PORT, loopback
by default), served by `serve` (and by `demo`, read-only, on the demo's database).

    GET  /                          Jobs: schedules in words, next fire, the last runs, paused or not
    GET  /backlog                   records by status per job, the oldest due, what waits and why
    GET  /failures?job=&code=&page= the newest Failed records (installments, fulfillments, line items), 50 a page
    GET  /records/{kind}/{id}       one record (installment, fulfillment, line-item): its fields, attempts, Digital
                                    River ids and application_logs rows
    GET  /digital-river             this process's Digital River requests per second against the budget, 429s and
                                    errors over the last hour (dr_view.py)
    GET  /processes                 engine processes: live or not, heartbeats, what each runs
    GET  /forecast?days=N           the charges to come per day and currency (`drjobs forecast`), computed in the
                                    background and cached (forecast_view.py), with a bar chart per currency
    GET  /login, POST /login        sign in with ADMIN_TOKEN; POST /logout
    POST /actions/retry             kind, id: `retry KIND ID`
    POST /actions/pause, /resume    job: `pause JOB`, `resume JOB`

Actions go through engine/controls.py, the functions behind the CLI commands, audited the same way in
`application_logs` (module `operator`) as `console client <address> session <id>`. They need ADMIN_TOKEN: with it
unset the console is read-only and every action answers 403 saying so. auth.py says how sign-in, the session
cookie, CSRF tokens and the Origin check work. Pages read counts and the newest rows through indexes with LIMITs
(engine/sql/console.sql), and every value is escaped by Jinja2's autoescaping and passed through the log
redaction (`redact_text`: no secret setting's value and no `sk_…` key is ever shown).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from markupsafe import Markup

from engine import forecast, status
from engine.console.auth import COOKIE, Auth, Session, origin_refusal
from engine.console.dr_view import DrSampler
from engine.console.forecast_view import ForecastCache, per_currency
from engine.controls import RETRY_KINDS, retry, set_paused
from engine.logs import error_text, get_logger, redact_text, register_secrets
from engine.metrics import COUNT_EXACTLY_BELOW, DB_ERRORS, record_counts, waiting_for_key
from engine.settings import DEFAULT_STOREFRONT, JOBS, Settings, _without_password, storefront_label
from engine.store import Store

log = get_logger(component="console")
HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_PAGE = 200  # 10,000 rows back: further than that, filter instead
RECENT_RUNS = 5
EXAMPLES = 5
COUNT_CAP = 10_000
# Tables record_counts estimates (as `status` does) also get exact counts of their Open, Pending and Failed records
# up to COUNT_CAP.
# Failed records of each kind whose codes the Failures page lists.
CODES_OF_NEWEST = 2000
# Due fulfillment records looked at for the Backlog page's oldest due and awaiting-acceptance rows.
DUE_WINDOW = 1000
# Reads of one page at once (on the engine's pool, which the jobs share).
PAGE_READS_AT_ONCE = 3
PAGE_TIMEOUT_SECONDS = 10.0
FAILED_SIGN_IN_DELAY = 1.0
# Failures' job filter → the kind of record it fails.
FAILING_JOBS = {"recurring-payments": "installment", "order-fulfillment": "fulfillment",
                "line-item-fulfillment": "line-item"}
KIND_JOB = {kind: job for job, kind in FAILING_JOBS.items()}
# application_logs modules that write about each kind of record (beside the operators' commands).
LOG_MODULES = {
    "installment": ["recurring-payments", "digital-river-events", "subscription-installments", "digital-river"],
    "fulfillment": ["order-fulfillment", "digital-river-events", "digital-river"],
    "line-item": ["line-item-fulfillment", "digital-river"],
}
# status_counts' kinds → the job that works on them.
KIND_OF_TABLE = {"subscriptions": "subscription-installments", "subscription_process_data": "recurring-payments",
                 "fulfillments": "order-fulfillment", "line_item_fulfillments": "line-item-fulfillment",
                 "dr_events": "digital-river-events", "application_logs": "log-cleanup"}
UNSET_TOKEN = ("ADMIN_TOKEN is unset: this console is read-only. Set ADMIN_TOKEN on the engine process and restart "
               "it to retry, pause and resume from here; meanwhile the CLI commands (retry, pause, resume) do it.")
NAV = [("jobs", "/", "Jobs"), ("backlog", "/backlog", "Backlog"), ("failures", "/failures", "Failures"),
       ("digital-river", "/digital-river", "Digital River"), ("processes", "/processes", "Engine processes"),
       ("forecast", "/forecast", "Forecast")]
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
CSS = (HERE / "static" / "console.css").read_text()


def _finalize(value: Any) -> Any:
    """Every `{{ value }}`: None shows as nothing, text goes through the log redaction (then autoescaping)."""
    if value is None:
        return ""
    if isinstance(value, str) and not isinstance(value, Markup):
        return redact_text(value)
    return value


def _when(value: datetime | float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | float | None, now: datetime | None = None) -> str:
    """"3 min ago", "in 2 h", from a time or a number of seconds (positive: in the past)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    else:
        seconds = float(value)
    text = status._age(abs(seconds)).replace("m", " min").replace("s", " s").replace("h", " h").replace("d", " d")
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def _age(value: float | None) -> str:
    """A number of seconds as "3 min", "1.5 h"."""
    if value is None:
        return "–"
    return _ago(abs(value)).removesuffix(" ago")


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _number(value: float | int | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, finalize=_finalize, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, age=_age, seconds=_seconds, number=_number)
    return env


ENV = _environment()


class Console:
    """The console's routes on an aiohttp application (the engine's HTTP listener adds them with `add_routes`).

    `built`: the jobs this engine version implements. `sampler`: this process's Digital River sampler (None: the
    page says this process makes no calls); `samplers`, one per storefront (label → sampler) when the process has
    several keys: the page shows one storefront at a time (`/digital-river?storefront=LABEL`).
    `read_only_reason`: the console refuses every action with this reason and offers no sign-in (the demo's);
    otherwise actions need ADMIN_TOKEN.
    """

    def __init__(self, settings: Settings, store: Store, *, built: set[str], sampler: DrSampler | None = None,
                 read_only_reason: str | None = None, samplers: dict[str, DrSampler] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.built = built
        self.samplers = dict(samplers or {})
        if sampler is not None or not self.samplers:
            self.samplers = {DEFAULT_STOREFRONT: sampler or DrSampler(None)} | self.samplers
        self.sampler = next(iter(self.samplers.values()))
        self.auth = Auth(None if read_only_reason else settings.admin_token)
        self.read_only_reason = read_only_reason or (None if self.auth.enabled else UNSET_TOKEN)
        self.forecasts = ForecastCache(self._compute_forecast)
        register_secrets(settings.secrets)

    def add_routes(self, app: web.Application) -> None:
        pages: list[tuple[str, Callable[[web.Request], Awaitable[tuple[str, dict[str, Any]]]]]] = [
            ("/", self._jobs), ("/backlog", self._backlog), ("/failures", self._failures),
            ("/records/{kind}/{id}", self._record), ("/digital-river", self._digital_river),
            ("/processes", self._processes), ("/forecast", self._forecast), ("/login", self._login_page),
        ]
        for path, handler in pages:
            app.router.add_get(path, self._page(handler))
        app.router.add_get("/console.css", self._css)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._logout)
        app.router.add_post("/actions/retry", self._retry)
        app.router.add_post("/actions/pause", self._pause)
        app.router.add_post("/actions/resume", self._resume)

    async def start(self) -> None:
        """Start sampling Digital River, and compile every template now rather than on its page's first view."""
        for name in ENV.list_templates(extensions=["html"]):
            ENV.get_template(name)
        for sampler in self.samplers.values():
            sampler.start()

    async def stop(self) -> None:
        for sampler in self.samplers.values():
            await sampler.stop()
        await self.forecasts.stop()

    async def _compute_forecast(self, days: int) -> dict[str, Any]:
        return await forecast.collect(self.store, days)  # looked up at each call: tests count the calls

    async def _gather(self, *reads: Awaitable[Any]) -> list[Any]:
        """The results of `reads`, run PAGE_READS_AT_ONCE at a time."""
        limit = asyncio.Semaphore(PAGE_READS_AT_ONCE)

        async def one(read: Awaitable[Any]) -> Any:
            async with limit:
                return await read

        return list(await asyncio.gather(*(one(r) for r in reads)))

    # -- rendering -----------------------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        return self.auth.session(request.cookies.get(COOKIE))

    def _render(self, request: web.Request, template: str, context: dict[str, Any], *, status_code: int = 200,
                active: str = "") -> web.Response:
        session = self._session(request)
        body = ENV.get_template(template).render(
            nav=NAV, active=active, session=session, read_only=self.read_only_reason,
            can_sign_in=self.auth.enabled, node=self.store.node, now=datetime.now(UTC),
            here=request.path_qs, **context)
        response = web.Response(text=body, status=status_code, content_type="text/html", charset="utf-8")
        response.headers.update(SECURITY_HEADERS)
        return response

    def _message(self, request: web.Request, title: str, message: str, *, status_code: int,
                 back: str = "/", ok: bool = False) -> web.Response:
        return self._render(request, "message.html", {"title": title, "message": message, "back": back, "ok": ok},
                            status_code=status_code)

    def _page(self, handler: Callable[[web.Request], Awaitable[tuple[str, dict[str, Any]]]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def page(request: web.Request) -> web.StreamResponse:
            try:
                template, context = await asyncio.wait_for(handler(request), PAGE_TIMEOUT_SECONDS)
            except web.HTTPException:
                raise
            except DB_ERRORS as exc:
                reason = (f"no answer within {PAGE_TIMEOUT_SECONDS:g} s" if isinstance(exc, TimeoutError)
                          else error_text(exc, 300))
                log.warning("console_page_failed", path=request.path, error=reason)
                return self._message(request, "The database did not answer",
                                     f"This page could not be read: {reason}. Try again in a moment.",
                                     status_code=503, back=request.path_qs)
            except _NotFound as exc:
                return self._message(request, "Not found", str(exc), status_code=404)
            except _BadRequest as exc:
                return self._message(request, "Bad request", str(exc), status_code=400, back=exc.back)
            return self._render(request, template, context, active=context.pop("active", ""))
        return page

    async def _css(self, request: web.Request) -> web.Response:
        response = web.Response(text=CSS, content_type="text/css", charset="utf-8")
        response.headers["Cache-Control"] = "max-age=300"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # -- pages ---------------------------------------------------------------------------------------------------

    async def _jobs(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        # status.collect's job rows, from cheap reads: the last runs through the (job, fire_time) index instead of
        # every run, and no counts (the Backlog page has them).
        now = datetime.now(UTC)
        paused_rows, node_rows, run_rows = await self._gather(
            self.store.fetch("paused_jobs"), self.store.fetch("status_nodes", self.settings.node_lost_seconds),
            self.store.fetch("console_recent_runs", list(JOBS), RECENT_RUNS))
        runs: dict[str, list[dict[str, Any]]] = {}
        for row in run_rows:
            run = dict(row)
            run["seconds"] = ((row["finished_at"] - row["started_at"]).total_seconds()
                              if row["finished_at"] else None)
            runs.setdefault(row["job"], []).append(run)
        jobs = status.job_rows(
            self.settings, self.built, now, last_runs={job: rows[0] for job, rows in runs.items()},
            paused={r["job"]: r for r in paused_rows}, oldest_due={},
            live_settings=[status._settings(r["settings"]) for r in node_rows if r["live"]], failures={})
        return "jobs.html", {"active": "jobs", "jobs": jobs, "runs": runs}

    async def _backlog(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        tables = list(KIND_OF_TABLE)
        # Counted or estimated by the rule `status` and /metrics use (engine.metrics.record_counts).
        counts = await record_counts(self.store)
        large = sorted({row["kind"] for row in counts if row["estimated"]})
        (to_do, oldest, waiting_rows, lines, awaiting, attention, events, paused_rows, no_key) = await self._gather(
            self.store.fetch("console_counts_to_do", COUNT_CAP) if large else _nothing(),
            self.store.fetch("console_oldest_waiting", DUE_WINDOW),
            self.store.fetch("console_installments_waiting", EXAMPLES, COUNT_CAP),
            self.store.fetchrow("console_lines_waiting", EXAMPLES, COUNT_CAP),
            self.store.fetchrow("console_lines_awaiting_acceptance", DUE_WINDOW),
            self.store.fetch("status_attention"), self.store.fetchrow("events_status"),
            self.store.fetch("paused_jobs"),
            waiting_for_key(self.store, [config.label for config in self.settings.keyed_storefronts],
                            subscriptions=True))
        # records[table] = {status: (count, how)}: how is "exact", "estimate" (PostgreSQL's statistics) or "over"
        # (more than COUNT_CAP, counted no further: the estimate is shown).
        records: dict[str, dict[str, tuple[int, str]]] = {t: {} for t in tables}
        for row in counts:
            records[row["kind"]][row["status"]] = (row["count"], "estimate" if row["estimated"] else "exact")
        for row in to_do:
            if row["kind"] in large:
                if row["count"] <= COUNT_CAP:
                    records[row["kind"]][row["status"]] = (row["count"], "exact")
                else:
                    estimate = records[row["kind"]].get(row["status"], (COUNT_CAP, "estimate"))[0]
                    records[row["kind"]][row["status"]] = (max(estimate, COUNT_CAP + 1), "over")
        for table in large:
            records[table] = {k: v for k, v in records[table].items() if v[0] > 0}
        return "backlog.html", {
            "active": "backlog", "records": records, "kind_of_table": KIND_OF_TABLE, "count_cap": COUNT_CAP,
            "oldest": {r["job"]: dict(r) for r in oldest}, "due_window": DUE_WINDOW,
            "waiting": {row["why"]: dict(row) for row in waiting_rows},
            "lines": dict(lines) if lines else None, "awaiting": dict(awaiting) if awaiting else None,
            "attention": [dict(r) for r in attention], "attention_text": status.ATTENTION,
            "events": dict(events) if events else None,
            "paused": [dict(r) for r in paused_rows],
            "exact_below_rows": COUNT_EXACTLY_BELOW,
            "waiting_for_key": no_key,
            "key_kinds": {"installments": "Installment records", "cancellations": "Order cancellations",
                          "subscriptions_due": "Subscriptions due (no installment made)",
                          "fulfillment_lines": "Line-item fulfillments"},
        }

    async def _failures(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        job = request.query.get("job", "")
        if job and job not in FAILING_JOBS:
            job = ""
        code = request.query.get("code", "")[:200] or None
        try:
            page = min(MAX_PAGE, max(1, int(request.query.get("page", "1"))))
        except ValueError:
            page = 1
        kinds = [FAILING_JOBS[job]] if job else list(FAILING_JOBS.values())
        rows = [dict(r) for r in await self.store.fetch("console_failures", kinds, code, (page - 1) * PAGE_SIZE,
                                                          PAGE_SIZE + 1)]
        more = len(rows) > PAGE_SIZE
        codes = [dict(r) for r in await self.store.fetch("console_failure_codes", kinds, 30, CODES_OF_NEWEST)]

        def link(**changes: Any) -> str:
            query = {"job": job, "code": code or "", "page": page} | changes
            return "/failures?" + urlencode({k: v for k, v in query.items() if v not in ("", None, 1)})

        return "failures.html", {
            "active": "failures", "rows": rows[:PAGE_SIZE], "job": job, "code": code or "", "page": page,
            "jobs": list(FAILING_JOBS), "codes": codes, "kind_job": KIND_JOB,
            "newer": link(page=page - 1) if page > 1 else None,
            "older": link(page=page + 1) if more and page < MAX_PAGE else None,
            "code_link": lambda kind, value: link(job=KIND_JOB[kind], code=value, page=1),
            "page_size": PAGE_SIZE, "codes_of_newest": CODES_OF_NEWEST,
        }

    async def _record(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        kind = request.match_info["kind"]
        raw_id = request.match_info["id"]
        if kind not in RETRY_KINDS or not raw_id.isdigit() or not 0 < int(raw_id) < 2**63:
            raise _NotFound(f"There is no {kind} record {raw_id}: kinds are {', '.join(RETRY_KINDS)}, ids positive "
                            "whole numbers.")
        record_id = int(raw_id)
        query = {"installment": "console_installment", "fulfillment": "console_fulfillment",
                 "line-item": "console_line_item"}[kind]
        row = await self.store.fetchrow(query, record_id)
        if row is None:
            raise _NotFound(f"There is no {kind} record {record_id}.")
        record = dict(row)
        context: dict[str, Any] = {"active": "failures", "kind": kind, "record_id": record_id,
                                   "fields": [(k, _field(v)) for k, v in record.items()], "record": record,
                                   "attempts": [], "lines": []}
        if kind == "installment":
            context["status"] = record["subscription_job_run_status"]
            context["attempts"] = [dict(r) for r in await self.store.fetch("console_installment_attempts",
                                                                            record_id, 50)]
            context["checkout"] = record["dr_checkout_id"]
            context["order"] = record["dr_order_id"]
            context["failed_orders"] = record.get("dr_failed_order_ids") or []
            context["message"] = record["last_error_message"]
            context["code"] = record["last_error_code"]
        else:
            context["status"] = record["efn_status"]
            context["checkout"] = None
            context["order"] = record.get("dr_order_id")
            context["failed_orders"] = []
            context["message"] = record["message"]
            context["code"] = None
            if kind == "fulfillment":
                context["lines"] = [dict(r) for r in await self.store.fetch("console_fulfillment_lines",
                                                                             record_id, 100)]
        logs = []
        for r in await self.store.fetch("console_record_logs", str(record_id), LOG_MODULES[kind],
                                        f"{kind} {record_id} ", 50):
            entry = dict(r)
            entry["request"] = _json_text(r["request"])
            entry["response"] = _json_text(r["response"])
            logs.append(entry)
        context["logs"] = logs
        context["retryable"] = context["status"] == "Failed"
        return "record.html", context

    async def _digital_river(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        asked = request.query.get("storefront", "")[:200]
        label = storefront_label(asked) if asked else next(iter(self.samplers))
        sampler = self.samplers.get(label)
        if sampler is None:
            label, sampler = next(iter(self.samplers.items()))
        suffix = "" if label == DEFAULT_STOREFRONT else f"_{label}"
        return "digital_river.html", {"active": "digital-river", "view": sampler.view(), "storefront": label,
                                      "storefronts": list(self.samplers), "budget_setting":
                                      f"DR_MAX_REQUESTS_PER_SECOND{suffix}",
                                      "kinds": ("ok", "429", "4xx", "5xx", "timeout", "connection_error")}

    async def _processes(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        nodes = []
        for row in await self.store.fetch("status_nodes", self.settings.node_lost_seconds):
            node = dict(row)
            published = status._settings(row["settings"])
            jobs = published.get("jobs")
            node["jobs"] = [{"job": str(name), "schedule": job.get("schedule"),
                             "description": job.get("schedule_description"), "concurrency": job.get("concurrency")}
                            for name, job in sorted(jobs.items()) if isinstance(job, dict)
                            ] if isinstance(jobs, dict) else []
            url = published.get("dr_api_url")
            node["dr_api_url"] = _without_password(url) if isinstance(url, str) else None
            node["published"] = {k: published.get(k) for k in ("schedule_time_zone", "lease_seconds",
                                                                "dr_max_requests_per_second")}
            node["state"] = "live" if row["live"] else ("stopped" if row["stopped_at"] else "lost")
            nodes.append(node)
        return "processes.html", {"active": "processes", "nodes": nodes,
                                  "lost_seconds": self.settings.node_lost_seconds}

    async def _forecast(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        raw = request.query.get("days", str(forecast.DEFAULT_DAYS)).strip()
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= forecast.MAX_DAYS):
            raise _BadRequest(f"days must be a whole number of days from 1 to {forecast.MAX_DAYS} (the default is "
                              f"{forecast.DEFAULT_DAYS}), not {raw[:40]!r}.", back="/forecast")
        days = int(raw)
        lookup = self.forecasts.get(days)
        result = lookup.result
        return "forecast.html", {
            "active": "forecast", "days": days, "max_days": forecast.MAX_DAYS, "lookup": lookup, "result": result,
            "data": result.data if result else None,
            "currencies": per_currency(result.data) if result else [],
            "max_age_minutes": round(self.forecasts.max_age / 60),
        }

    async def _login_page(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        return "login.html", {"next": _local(request.query.get("next", "/")), "error": None}

    # -- sign-in -------------------------------------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        target = _local(str(form.get("next", "/")))
        if not self.auth.enabled:
            return self._message(request, "Sign-in is off", self.read_only_reason or UNSET_TOKEN, status_code=403)
        refusal = origin_refusal(request.host, request.headers.get("Origin"), request.headers.get("Referer"))
        if refusal:
            log.warning("console_sign_in_refused", client=request.remote, reason=refusal)
            return self._message(request, "Refused", f"Sign-in refused: {refusal}.", status_code=403)
        if not self.auth.token_matches(str(form.get("token", ""))):
            log.warning("console_sign_in_refused", client=request.remote, reason="wrong token")
            await asyncio.sleep(FAILED_SIGN_IN_DELAY)  # a guess a second at most per connection
            return self._render(request, "login.html", {"next": target, "error": "That is not ADMIN_TOKEN."},
                                status_code=403)
        cookie = self.auth.new_session()
        session = self.auth.session(cookie)
        log.info("console_signed_in", client=request.remote, session=session.id if session else None)
        response = _see_other(target)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/", secure=request.secure,
                            max_age=int(self.auth.session_seconds))
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        refusal = origin_refusal(request.host, request.headers.get("Origin"), request.headers.get("Referer"))
        if refusal:
            return self._message(request, "Refused", f"Sign-out refused: {refusal}.", status_code=403)
        response = _see_other("/")
        response.del_cookie(COOKIE, path="/")
        return response

    # -- actions -------------------------------------------------------------------------------------------------

    async def _authorised(self, request: web.Request, action: str) -> tuple[Session | None, Any, web.Response | None]:
        """(session, form, None) when the action may go ahead, else (None, form, the refusal to answer)."""
        form = await request.post()
        back = _local(str(form.get("back", "/")))
        reason: str | None = None
        status_code = 403
        session = None
        if self.read_only_reason:
            reason = self.read_only_reason
        elif refusal := origin_refusal(request.host, request.headers.get("Origin"), request.headers.get("Referer")):
            reason = f"refused: {refusal}"
        elif (session := self._session(request)) is None:
            reason, status_code = "refused: sign in with ADMIN_TOKEN first (your session is missing or expired)", 401
        elif not self.auth.csrf_matches(session, str(form.get("csrf", ""))):
            reason = "refused: the form's CSRF token is missing or not this session's; reload the page and try again"
        if reason is None:
            return session, form, None
        log.warning("console_action_refused", action=action, client=request.remote, reason=reason)
        return None, form, self._message(request, "Not done", reason, status_code=status_code, back=back)

    def _who(self, request: web.Request, session: Session) -> str:
        return f"console client {request.remote or 'unknown'} session {session.id}"

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        session, form, refused = await self._authorised(request, "retry")
        if refused is not None or session is None:
            return refused or self._message(request, "Not done", "refused", status_code=403)
        kind, raw_id = str(form.get("kind", "")), str(form.get("id", ""))
        if kind not in RETRY_KINDS or not raw_id.isdigit() or not 0 < int(raw_id) < 2**63:
            return self._message(request, "Not done", f"Unknown record {kind!r} {raw_id!r}: kinds are "
                                 f"{', '.join(RETRY_KINDS)}, ids positive whole numbers.", status_code=400)
        outcome = await retry(self.store, kind, int(raw_id), who=self._who(request, session))
        log.info("console_action", action="retry", kind=kind, record=int(raw_id), ok=outcome.ok,
                 client=request.remote, session=session.id)
        return self._message(request, "Done" if outcome.ok else "Not done", outcome.message,
                             status_code=200 if outcome.ok else 409, back=f"/records/{kind}/{int(raw_id)}",
                             ok=outcome.ok)

    async def _pause(self, request: web.Request) -> web.StreamResponse:
        return await self._set_paused(request, True)

    async def _resume(self, request: web.Request) -> web.StreamResponse:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.StreamResponse:
        action = "pause" if paused else "resume"
        session, form, refused = await self._authorised(request, action)
        if refused is not None or session is None:
            return refused or self._message(request, "Not done", "refused", status_code=403)
        job = str(form.get("job", ""))
        if job not in JOBS:
            return self._message(request, "Not done", f"Unknown job {job!r}: one of {', '.join(JOBS)}.",
                                 status_code=400)
        outcome = await set_paused(self.store, job, paused, who=self._who(request, session))
        log.info("console_action", action=action, job=job, client=request.remote, session=session.id)
        return self._message(request, "Done", outcome.message, status_code=200, back="/", ok=True)


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, message: str, *, back: str = "/") -> None:
        super().__init__(message)
        self.back = back


def _see_other(location: str) -> web.Response:
    """303 to `location` (a path of this console): the page after a POST is read with a GET."""
    response = web.Response(status=303, headers={"Location": location})
    response.headers.update(SECURITY_HEADERS)
    return response


async def _nothing() -> list[Any]:
    return []


def _local(path: str) -> str:
    """`path` if it is a path of this console (a redirect after sign-in goes nowhere else), else `/`."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path and len(path) < 2000:
        return path
    return "/"


def _field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _when(value) + " UTC"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _json_text(value: str | None) -> str | None:
    """A jsonb column (text, as the store decodes it) pretty-printed, cut at 4,000 characters."""
    if value is None:
        return None
    try:
        text = json.dumps(json.loads(value), indent=2, ensure_ascii=False)
    except ValueError:
        text = value
    return text if len(text) <= 4000 else text[:4000] + "\n…"
