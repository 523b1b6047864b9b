"""The UI in a real browser: the server `medvlm serve` builds, headless Chromium driven by selenium
uploads a DICOM, asks a question, sees the streamed reply, drafts a report, saves a screenshot.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` package; skips
with the reason when one is missing. Set MEDVLM_SCREENSHOT=PATH to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve_fixtures import ANSWER, ct_small, free_port, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without these, headless Chromium in a container with no network stalls or crashes.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1500"]
TIMEOUT = 120

pytestmark = [
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium"),
    pytest.mark.skipif(not CHROMEDRIVER.exists(), reason=f"{CHROMEDRIVER} is missing: apt-get install chromium-driver"),
]


@pytest.fixture
def server(taught_checkpoint):
    """What `medvlm serve --model CKPT --port P` builds, run in a thread on a free local port."""
    from serve.cli import build_server
    from vlm.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", str(taught_checkpoint), "--port", str(free_port())])
    server, engine, url = build_server(args)
    assert url == f"http://127.0.0.1:{args.port}/"
    try:
        with running(server):
            assert httpx.get(url + "health", timeout=TIMEOUT).json()["status"] == "ok"
            yield url
    finally:
        engine.close()


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_uploads_chats_and_drafts_a_report(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT)
    find = browser.find_element
    browser.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    assert "not a medical device" in find(By.ID, "notice").text

    find(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(ct_small()))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
    wait.until(lambda d: "DICOM CT" in d.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value"))

    find(By.CSS_SELECTOR, "#message textarea").send_keys("What is this?")
    find(By.ID, "send").click()
    wait.until(lambda d: ANSWER in d.find_element(By.ID, "chatbot").text)

    # The model drafts chest radiographs only: for this CT the draft names the study and says so.
    find(By.ID, "draft").click()
    study = (By.CSS_SELECTOR, "#study textarea")
    wait.until(lambda d: d.find_element(*study).get_attribute("value").startswith("CT "))
    assert "frontal chest radiographs only" in find(By.CSS_SELECTOR, "#findings textarea").get_attribute("value")
    assert find(By.CSS_SELECTOR, "#impression textarea").get_attribute("value").startswith("No draft")

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MEDVLM_SCREENSHOT"):
        shutil.copy(shot, os.environ["MEDVLM_SCREENSHOT"])
