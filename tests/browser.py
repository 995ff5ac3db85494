"""Driving Debian's chromium headless through selenium and Debian's chromedriver (no download: the
machines here have no internet). Missing browser: skip locally, fail under CI=true."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.service_helpers import REPO, unavailable

CHROMIUM = os.environ.get("SRCOMPRESS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SRCOMPRESS_CHROMEDRIVER", "/usr/bin/chromedriver")
# Screenshots of the browser tests: kept after the run (CI uploads the folder).
ARTIFACTS = Path(os.environ.get("SRCOMPRESS_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts")) / "dashboard"


def browser_unavailable_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).exists() or shutil.which(path)):
            return f"{path} is missing (apt-get install {package}; scripts/setup.sh does)"
    return None


@contextmanager
def chromium(downloads: Path) -> Iterator[Any]:
    """A headless chromium (selenium WebDriver) that saves downloads in ``downloads``."""
    reason = browser_unavailable_reason()
    if reason:
        unavailable(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,900",  # a laptop screen
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    downloads.mkdir(parents=True, exist_ok=True)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy (exceptions count as not yet); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # an element not there yet, a stale one
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


# Every form control on the page without a label: a <label for>, a wrapping <label>, aria-label(ledby).
UNLABELLED_CONTROLS = """
return [...document.querySelectorAll('input, select, textarea')]
  .filter((c) => c.type !== 'hidden')
  .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute('aria-label')
    && !c.getAttribute('aria-labelledby'))
  .map((c) => c.outerHTML.slice(0, 120));
"""

# Drop a file on an element, as a user dragging it from their desktop does (a DataTransfer drop event).
DROP_FILE = """
const [selector, name, type, base64] = arguments;
const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type }));
const target = document.querySelector(selector);
for (const kind of ['dragenter', 'dragover', 'drop']) {
  target.dispatchEvent(new DragEvent(kind, { dataTransfer: transfer, bubbles: true, cancelable: true }));
}
"""


def drop_file(driver: Any, selector: str, name: str, data: bytes, content_type: str = "image/png") -> None:
    driver.execute_script(DROP_FILE, selector, name, content_type, base64.b64encode(data).decode())
