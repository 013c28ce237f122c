"""Open a local self-contained HTML file in headless Chromium and report what a reader would see.

Not a test module: tests import it and skip when `browser_missing_reason()` is not None.
Needs Debian's chromium + chromium-driver (bash scripts/install-browser.sh) and PyPI selenium.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MAX_SCREENSHOT_HEIGHT = 6000
# Lazy images past the (capped) window would never load and would read as broken: load them all.
EAGER_IMAGES_JS = "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')"
# Headless-new window sizes include ~140 px of emulated browser chrome above the viewport, so the
# window must be that much taller than the document or the screenshot loses the page bottom.
WINDOW_HEIGHT_JS = "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
IMAGES_DONE_JS = "return Array.from(document.images).every(i => i.complete)"
# An image "did not render" when it never finished or decoded to nothing (naturalWidth 0).
BROKEN_IMAGES_JS = """
return Array.from(document.images)
  .filter(img => !img.complete || img.naturalWidth === 0)
  .map(img => img.getAttribute('alt') || (img.getAttribute('src') || '').slice(0, 80));
"""


@dataclass
class PageCheck:
    title: str
    console_errors: list[str]
    images: int
    broken_images: list[str]  # src (truncated to 80 chars) or alt of each image that did not render


def browser_missing_reason() -> str | None:
    """None when the check can run; else why not, for pytest.skip."""
    hint = "(bash scripts/install-browser.sh)"
    if not CHROMIUM.is_file():
        return f"chromium not installed at {CHROMIUM} {hint}"
    if not CHROMEDRIVER.is_file():
        return f"chromedriver not installed at {CHROMEDRIVER} {hint}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (.venv/bin/pip install selenium)"
    return None


def check_page(html: Path, screenshot: Path, width: int = 1280) -> PageCheck:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    # Explicit binary + driver paths: selenium-manager is skipped and never tries the network.
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(Path(html).resolve().as_uri())
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
        driver.execute_script(EAGER_IMAGES_JS)
        height = int(driver.execute_script(WINDOW_HEIGHT_JS))
        driver.set_window_size(width, min(height, MAX_SCREENSHOT_HEIGHT))
        try:
            WebDriverWait(driver, 5, poll_frequency=0.1).until(lambda d: d.execute_script(IMAGES_DONE_JS))
        except TimeoutException:  # a stuck image is reported below as broken, not raised
            pass
        broken: list[str] = driver.execute_script(BROKEN_IMAGES_JS)
        images: int = driver.execute_script("return document.images.length")
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return PageCheck(title=driver.title, console_errors=errors, images=images, broken_images=broken)
    finally:
        driver.quit()
