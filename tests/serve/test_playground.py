"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

`make browser` installs the browser (`make test` runs it first). Without it these tests skip and say why.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.serve.support import BASE_NAME, chat_ids, start_server
from tests.tiny import tiny_tokenizer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
TIMEOUT = 60


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(f"headless Chromium is not installed (chromium: {CHROMIUM}, chromedriver: {CHROMEDRIVER}); run "
                    "`make browser` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def text_of(element) -> str:
    return element.get_property("textContent")


def choose_models(driver, models: list[str]) -> None:
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("value") in models):
            box.click()


def test_compare_the_base_and_two_adapters_side_by_side(browser, served, references, caplog):
    browser.get(served.url + "/")
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    listed = [box.get_attribute("value") for box in browser.find_elements(By.CSS_SELECTOR, "#models input")]
    assert listed[0] == BASE_NAME and sorted(listed[1:]) == sorted(references.adapter_dirs)
    assert f"base model: {BASE_NAME}" in text_of(browser.find_element(By.ID, "server-info"))
    models = [BASE_NAME, "all-r8", "regex-r6"]
    choose_models(browser, models)
    browser.find_element(By.ID, "prompt").send_keys("Compare us")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")
    with caplog.at_level(logging.INFO, logger="lorakit.serve.access"):
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, TIMEOUT).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer .status[data-state=done]")) == len(models))
    columns = browser.find_elements(By.CSS_SELECTOR, "#results .answer")
    assert [c.get_attribute("data-model") for c in columns] == models  # side by side, in the order picked
    prompt = chat_ids(tiny_tokenizer(), "Compare us")
    for column, model in zip(columns, models):
        expected = references.text(None if model == BASE_NAME else model, prompt, 8)
        assert text_of(column.find_element(By.CSS_SELECTOR, ".text")) == expected, model
        assert "done (" in text_of(column.find_element(By.CSS_SELECTOR, ".status"))
    answers = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lorakit.serve.access"]
    chat = [a for a in answers if a["path"] == "/v1/chat/completions"]
    assert sorted(a["model"] for a in chat) == sorted(models) and all(a["stream"] for a in chat)  # streamed


def test_the_page_asks_for_the_api_key(browser, adapter_dirs):
    running, thread = start_server(None, {"qv-r4": adapter_dirs["qv-r4"]}, settings={"api_key": "page-key"})
    try:
        browser.get(running.url + "/")
        WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert "API key" in text_of(browser.find_element(By.ID, "error"))
        assert browser.find_elements(By.CSS_SELECTOR, "#models input") == []
        key = browser.find_element(By.ID, "api-key")
        key.send_keys("page-key")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        WebDriverWait(browser, TIMEOUT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 2)
        assert text_of(browser.find_element(By.ID, "error")) == ""
    finally:
        thread.stop()
        running.server.close()
