"""Fixtures of the report tests: run directories written with the real writers, reports built
from them once per module, and a headless Chromium driven by Selenium (skipped, with the reason,
where Chromium or its driver is not installed: ``scripts/system-deps.sh`` installs both)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepfleet.report import Report, ReportFiles, build_report
from tests.report.runs import RunInfo, make_run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags for a machine with a closed network: no sandbox (root in CI), no GPU, and no background
# connections (component updates, sync, QUIC), which would otherwise hang or log errors.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1600")


@pytest.fixture(scope="session")
def search_run(tmp_path_factory: pytest.TempPathFactory) -> RunInfo:
    """A small search: 3 classes (simulated / estimated / measured energy), 9 devices, 24 trials,
    drift checks and failures: about 230 rows."""
    return make_run(tmp_path_factory.mktemp("search"), trials=24)


@pytest.fixture(scope="session")
def search_report(search_run: RunInfo) -> tuple[ReportFiles, Report]:
    return build_report(search_run.root)


@pytest.fixture(scope="session")
def measure_run(tmp_path_factory: pytest.TempPathFactory) -> RunInfo:
    """A 'deepfleet measure' run: results only (no candidates, no artifacts)."""
    info = make_run(tmp_path_factory.mktemp("measure"), trials=5, candidates=False,
                    reference_every=2)
    shutil.rmtree(info.root / "artifacts")
    return info


@pytest.fixture(scope="session")
def measure_report(measure_run: RunInfo) -> tuple[ReportFiles, Report]:
    return build_report(measure_run.root)


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        return (f"{CHROMIUM} or {CHROMEDRIVER} missing (Debian packages chromium, "
                "chromium-driver: run scripts/system-deps.sh as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver) with a fresh profile, browser console logging
    on. Only the local chromedriver is used: Selenium Manager never runs (nothing downloaded)."""
    if (why := _browser_missing()):
        pytest.skip(f"browser tests: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
