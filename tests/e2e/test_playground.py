"""The playground at GET / in a real headless browser (Debian's chromium via chromium-driver):
a generation through the page renders its image in the gallery with the seed and timings, and
a wrong key shows the gateway's error."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.gateway_process import KEYS

pytestmark = pytest.mark.e2e

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make setup installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def fill(browser, gateway, key: str, seed: str) -> None:
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(key)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a lighthouse at dusk")
    Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
    for field, value in (("steps", "1"), ("seed", seed)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate").click()


def test_a_generated_image_renders_with_its_seed_and_timings(browser, gateway):
    fill(browser, gateway, KEYS[0], "5")
    image = WebDriverWait(browser, 120).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#gallery figure img")))
    # Decoded by the browser: complete with the generated size, not a broken-image icon.
    WebDriverWait(browser, 30).until(lambda _: browser.execute_script("return arguments[0].complete", image))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [64, 64]
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "seed 5" in caption and "denoise" in caption and "round trip" in caption
    assert "1 image(s)" in browser.find_element(By.ID, "status").text


def test_a_wrong_key_shows_the_gateways_error(browser, gateway):
    fill(browser, gateway, "not-the-key-0123456789", "6")
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda _: "error" in status.get_attribute("class"))
    assert "missing or unknown API key" in status.text
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery figure") == []
