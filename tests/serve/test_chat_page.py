"""The chat page at / in a real headless browser (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver (make install-browser)",
)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_typing_a_message_streams_the_reply(browser, slow_server):
    browser.get(slow_server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text)  # /v1/models answered
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there")
    box.send_keys(Keys.ENTER)

    bubble = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))[0]
    lengths = set()  # the reply's length as it grows, seen while it streams
    while bubble.get_attribute("data-state") != "done":
        lengths.add(len(bubble.get_attribute("textContent")))
        assert len(lengths) < 10_000
        time.sleep(0.01)
    reply = bubble.get_attribute("textContent")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "Hello there"
    assert "error" not in bubble.get_attribute("class"), reply
    assert reply and len([n for n in lengths if 0 < n < len(reply)]) >= 2, (lengths, reply)
    assert browser.find_element(By.ID, "status").text == "ready"
