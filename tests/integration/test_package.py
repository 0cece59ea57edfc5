"""The package as a deployer installs it: a wheel built from this checkout, installed into a new virtual
environment, gives a `drjobs` command that works from `/`, with the schema and the migrations inside the package."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.db import fetchval
from tests.support import ROOT, engine_env


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = out.glob("drjobs-*.whl")
    return wheel


def _install(wheel: Path, venv: Path) -> Path:
    """A new virtual environment with the wheel alone installed (no editable checkout on its path); the
    dependencies come from this test run's environment through a .pth file, so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Only the dependencies' directory: a path added by a .pth file has its own .pth files (the checkout's
    # editable install among them) ignored.
    Path(site, "drjobs_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin" / "drjobs"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("package")
    wheel = _build_wheel(base / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "engine/schema.sql" in names and "engine/migrations/0001_baseline.sql" in names, names
    assert any(name.startswith("engine/sql/") and name.endswith(".sql") for name in names)
    drjobs = _install(wheel, base / "venv")
    # The installed package is the one that runs, not this checkout.
    where = subprocess.run([str(drjobs.parent / "python"), "-c", "import engine; print(engine.__file__)"],
                           check=True, capture_output=True, text=True, cwd="/").stdout.strip()
    assert where and not where.startswith(str(ROOT)), where
    return drjobs


async def _drjobs(drjobs: Path, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(drjobs), *args, env=env, cwd="/",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_installed_command_runs_from_the_root_directory(installed: Path, pg_server_dsn: str) -> None:
    from tests.db import admin, drop_database, with_database

    env = {k: v for k, v in engine_env(None).items() if k != "PYTHONPATH"}
    code, out, err = await _drjobs(installed, ["--help"], env)
    assert code == 0 and out.startswith("usage: drjobs"), err
    code, out, _ = await _drjobs(installed, ["run", "--help"], env)
    assert code == 0 and "recurring-payments" in out

    name = "drjobs_package_check"
    await admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    dsn = with_database(pg_server_dsn, name)
    try:
        code, _, err = await _drjobs(installed, ["status"], engine_env(dsn))
        assert code == 2 and "no drjobs schema" in err, err
        code, _, err = await _drjobs(installed, ["migrate"], engine_env(dsn))
        assert code == 0, err
        assert await fetchval(dsn, "SELECT count(*) FROM schema_migrations") >= 1
        code, out, err = await _drjobs(installed, ["status"], engine_env(dsn))
        assert code == 0 and "JOBS" in out, err
    finally:
        await drop_database(pg_server_dsn, name)
