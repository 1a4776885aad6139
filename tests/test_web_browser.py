"""`mllm web` in a real browser: Debian's headless Chromium, driven by Selenium through Debian's chromedriver,
loads the page, uploads an image, asks a question and waits for the streamed answer; a screenshot is saved
(to $MLLM_WEB_SCREENSHOT too when set: that is how docs/web_screenshot.png is made).

Skipped only where the browser or its driver is not installed (`apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from helpers.web import QUESTION, chat_greedy, fixture_image, start_server
from PIL import Image

NEW_TOKENS = 20
TIMEOUT_S = 90
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
)


def _browser_paths() -> tuple[str, str]:
    binary = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            "headless Chromium is not installed (looked for chromium and chromedriver on PATH): "
            "apt-get install chromium chromium-driver"
        )
    return binary, driver


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = start_server(tiny_model_dir)
    yield app
    app.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def _visible(text: str) -> str:
    """Text as a page shows it: printable characters only, runs of whitespace as one space."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _set_number(driver, elem_id: str, value: int) -> None:
    """Type a value into a slider's number box (what a user does to change it precisely)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_browser_uploads_asks_and_sees_the_answer(server, browser, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from mllm.api import load

    model, processor = load(tiny_model_dir, "cpu", "auto")
    image = Image.open(fixture_image(tiny_model_dir)).convert("RGB")
    expected = chat_greedy(model, processor, [{"role": "user", "content": [image, QUESTION]}], NEW_TOKENS)
    assert _visible(expected), "the fixture model should say something visible for this prompt"

    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(server.local_url)
    question = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#question textarea")))
    browser.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(
        str(fixture_image(tiny_model_dir))
    )
    wait.until(ec.text_to_be_present_in_element((By.ID, "images"), fixture_image(tiny_model_dir).stem))
    _set_number(browser, "max-new-tokens", NEW_TOKENS)
    question.send_keys(QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    started = time.monotonic()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Done"))
    page_answer = _visible(browser.find_element(By.ID, "chatbot").text)
    shot = tmp_path / "web.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("MLLM_WEB_SCREENSHOT"):
        Path(os.environ["MLLM_WEB_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, os.environ["MLLM_WEB_SCREENSHOT"])
    origin = server.local_url.rstrip("/")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(url.startswith(origin) for url in loaded), loaded
    outside = [url for url in loaded if not url.startswith((origin, "data:", "blob:"))]
    assert not outside, f"the page loaded resources from elsewhere than the server: {outside}"
    assert _visible(expected) in page_answer, (
        f"answer not on the page after {time.monotonic() - started:.0f}s"
    )
    assert QUESTION in page_answer
    assert shot.stat().st_size > 10_000
