"""A real headless Chromium for page tests (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).

Nothing is downloaded at run time: the driver and the browser are the system's executables
(``scripts/setup_browser.sh`` installs them); without them the tests skip and say why.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

CHROMIUM = os.environ.get("ULTRA_FAST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ULTRA_FAST_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-dev-shm-usage", "--window-size=1400,1100", "--force-device-scale-factor=1")


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; scripts/setup_browser.sh)"
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no {what} at {path} (apt-get install chromium chromium-driver; scripts/setup_browser.sh)"
    return ""


@pytest.fixture(scope="module")
def browser():
    """A selenium Chrome driver on a fresh profile, logging the console; skips when there is no browser."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="ultra_fast_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        # an explicit driver path: selenium Manager then never looks for (or downloads) a driver
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as e:  # a browser that is installed but cannot start here (no shared memory, ...)
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list:
    """The console's errors and warnings since the last call (the log is drained by reading it)."""
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]


def open_page(driver, path, ready: str) -> None:
    """Load a local page and wait until the JS expression ``ready`` is truthy."""
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get("file://" + os.path.abspath(str(path)))
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(f"return !!({ready});"))
