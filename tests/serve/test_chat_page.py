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


def watch_reply(browser, index: int) -> tuple[set[int], str, object]:
    """Lengths of the index-th assistant reply seen while it streams, its text, its element."""
    bubble = wait_for(
        lambda: (
            (found := browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
            and len(found) > index
            and found[index]
        )
    )
    lengths = set()
    while bubble.get_attribute("data-state") != "done":
        lengths.add(len(bubble.get_attribute("textContent")))
        assert len(lengths) < 10_000
        time.sleep(0.01)
    return lengths, bubble.get_attribute("textContent"), bubble


def test_typing_a_message_streams_the_reply(browser, slow_server):
    browser.get(slow_server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text)  # /v1/models answered
    box = browser.find_element(By.ID, "input")
    # The page samples, so a reply may end after a token or two; streaming shows only in a
    # reply of several tokens, so ask again (a bounded number of times) until one comes.
    for turn in range(5):
        box.send_keys("Hello there")
        box.send_keys(Keys.ENTER)
        lengths, reply, bubble = watch_reply(browser, turn)
        assert browser.find_elements(By.CSS_SELECTOR, ".message.user")[turn].text == "Hello there"
        assert "error" not in bubble.get_attribute("class"), reply
        wait_for(lambda: browser.find_element(By.ID, "status").text == "ready")
        if reply and len([n for n in lengths if 0 < n < len(reply)]) >= 2:
            break
    else:
        pytest.fail(f"no reply was seen growing in 5 turns (last: {lengths}, {reply!r})")
