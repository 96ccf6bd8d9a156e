"""Headless Debian Chromium for the e2e tests: a driver, stable locators, failure evidence.

Only the system browser and driver are used (``/usr/bin/chromium`` and ``/usr/bin/chromedriver``, or
``EDGELOOP_CHROMIUM`` / ``EDGELOOP_CHROMEDRIVER``): the driver path is given to the Service, so Selenium
Manager is never asked to find or download anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import skip_unless_ci

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "e2e"
CHROMIUM = os.environ.get("EDGELOOP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGELOOP_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1200")
WAIT_S = 30.0  # the longest a page of the UI may take to show an element


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skips without them, but fails on CI (CI=true)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(path) and os.access(path, os.X_OK))]
    if missing:
        skip_unless_ci(f"headless browser not installed: {', '.join(missing)} missing "
                       "(apt-get install chromium chromium-driver)")
    return CHROMIUM, CHROMEDRIVER


def start_chromium(profile_dir: Path, log_file: Path):
    """A headless Chromium session with a fresh profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in CHROMIUM_ARGS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver, log_output=str(log_file)), options=options)
    driver.set_page_load_timeout(60)
    return driver


# ---- locators (visible text and roles, not generated class names or ids) -----------------------------

def text_literal(text: str) -> str:
    """``text`` as an XPath 1.0 string literal (handles quotes)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ", \"'\", ".join(f"'{part}'" for part in text.split("'")) + ")"


def button(text: str) -> str:
    return f"//button[normalize-space()={text_literal(text)}]"


def menu_item(text: str) -> str:
    return f"//*[@role='menuitem'][normalize-space()={text_literal(text)}]"


def form_field(label_start: str, scope: str = "") -> str:
    """The block of a schema-form property (its label, menu and input) whose label starts with ``label_start``."""
    return (f"{scope}//label[starts-with(normalize-space(), {text_literal(label_start)})]"
            "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' group ')][1]")


# ---- waits ---------------------------------------------------------------------------------------------

def wait(driver, timeout_s: float = WAIT_S):
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2, ignored_exceptions=(
        StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException))


def clickable(driver, xpath: str, timeout_s: float = WAIT_S):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    return wait(driver, timeout_s).until(EC.element_to_be_clickable((By.XPATH, xpath)),
                                         f"nothing clickable at {xpath}")


def click(driver, xpath: str, timeout_s: float = WAIT_S) -> None:
    """Click the first element at ``xpath`` once it is shown and enabled; retried while the page re-renders."""
    from selenium.webdriver.common.by import By

    def attempt(d) -> bool:
        elements = d.find_elements(By.XPATH, xpath)
        if not elements or not elements[0].is_displayed() or not elements[0].is_enabled():
            return False
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", elements[0])
        elements[0].click()
        return True

    wait(driver, timeout_s).until(attempt, f"nothing clickable at {xpath}")


def visible(driver, xpath: str, timeout_s: float = WAIT_S):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    return wait(driver, timeout_s).until(EC.visibility_of_element_located((By.XPATH, xpath)),
                                         f"nothing visible at {xpath}")


def gone(driver, xpath: str, timeout_s: float = WAIT_S) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait(driver, timeout_s).until(EC.invisibility_of_element_located((By.XPATH, xpath)), f"still shown: {xpath}")


def insert_text(driver, text: str) -> None:
    """Insert ``text`` at the focused element at once, like a paste (no auto-closed brackets in code editors)."""
    driver.execute_cdp_cmd("Input.insertText", {"text": text})


# ---- evidence on failure -------------------------------------------------------------------------------

def save_evidence(driver, name: str) -> list[Path]:
    """Screenshot, page source and browser console of the current page under test-artifacts/e2e/."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = ARTIFACTS_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    saved = []
    with contextlib.suppress(Exception):
        driver.save_screenshot(str(stem.with_suffix(".png")))
        saved.append(stem.with_suffix(".png"))
    with contextlib.suppress(Exception):
        stem.with_suffix(".html").write_text(f"<!-- {driver.current_url} -->\n{driver.page_source}")
        saved.append(stem.with_suffix(".html"))
    with contextlib.suppress(Exception):
        console = "\n".join(json.dumps(entry) for entry in driver.get_log("browser"))
        stem.with_suffix(".console.log").write_text(console)
        saved.append(stem.with_suffix(".console.log"))
    return saved


@contextlib.contextmanager
def evidence_on_failure(driver, name: str, driver_log: Path | None = None) -> Iterator[None]:
    """Re-raise any failure inside the block after saving what the browser showed."""
    try:
        yield
    except BaseException as error:
        saved = save_evidence(driver, name)
        if driver_log is not None and driver_log.is_file():
            with contextlib.suppress(OSError):
                shutil.copyfile(driver_log, ARTIFACTS_DIR / f"{name}.chromedriver.log")
        if saved and isinstance(error, Exception):
            error.add_note(f"browser evidence: {', '.join(str(path) for path in saved)}")
        raise
