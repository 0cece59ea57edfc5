"""Browser tests: Playwright for Python driving Debian's Chromium (/usr/bin/chromium, `apt-get install -y chromium`;
never `playwright install`, which would download a browser). Without Playwright or Chromium every test here is
skipped, saying which is missing. Screenshots go to DRJOBS_ARTIFACTS (default tests/artifacts/)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("DRJOBS_CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parent.parent.parent


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return ("BROWSER TESTS SKIPPED: Playwright for Python is not installed (pip install -e '.[dev]' installs it; "
                "no `playwright install` is needed)")
    if not CHROMIUM.exists():
        return f"BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does it)"
    return None


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go: DRJOBS_ARTIFACTS, or tests/artifacts/."""
    path = Path(os.environ.get("DRJOBS_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            await launched.close()
