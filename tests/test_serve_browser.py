"""The chat page in a real browser: headless Chromium (Debian's `chromium`, driven through `chromium-driver` by
selenium) opens the page served by `cogvlm serve`, uploads a shipped image, asks, reads the answer as it streams
in, asks a follow-up, and keeps a screenshot (under pytest's tmp folder; one copy is docs/serve.png). Skipped only
where chromium is not installed."""
from __future__ import annotations

import shutil

import pytest

from .test_serve import IMAGES, permissive_server, reference_model, stop_servers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                         "chromium chromium-driver)")
# Flags that keep a sandboxed headless Chromium off the network (this machine has none) and quiet.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,760"]
# Records every text the answer bubbles show, to see the answer arrive piece by piece.
WATCH = """
window.shown = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.msg.assistant');
  if (bubbles.length) window.shown.push(bubbles[bubbles.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield permissive_server(tmp_path_factory)
    stop_servers()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def ask(driver, question: str, answers_before: int) -> tuple[str, list[str]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.shown = window.shown || []; window.shown.length = 0;")
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    done = '.msg.assistant[data-done="true"]'
    WebDriverWait(driver, 90).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > answers_before)
    errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert not errors, errors[0].text
    return driver.find_elements(By.CSS_SELECTOR, done)[-1].text, driver.execute_script("return window.shown")


def test_page_uploads_an_image_asks_and_streams_the_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = reference_model()
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model").text.startswith("tiny-shapes"))
    browser.execute_script(WATCH)
    browser.find_element(By.ID, "image-input").send_keys(str(IMAGES[3]))
    WebDriverWait(browser, 30).until(
        lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))

    q1, q2 = "Describe the image.", "What colour is the shape?"
    a1, shown = ask(browser, q1, 0)
    assert a1 == model.chat(IMAGES[3], q1)
    assert len(set(shown)) > 2 and shown[-1] == a1, f"the answer did not arrive in pieces: {shown}"
    assert all(a1.startswith(s) for s in shown), shown

    a2, _ = ask(browser, q2, 1)  # a follow-up in the same conversation
    assert a2 == model.chat(IMAGES[3], q2, history=[(q1, a1)])
    assert browser.find_element(By.ID, "status").text == "done"
    screenshot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"\nscreenshot: {screenshot}")

    browser.find_element(By.ID, "new").click()  # start over: the log empties, the image stays for the next one
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    a3, _ = ask(browser, q2, 0)
    assert a3 == model.chat(IMAGES[3], q2)
