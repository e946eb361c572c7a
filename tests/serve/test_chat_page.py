"""The chat page at GET / in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which scripts/setup.sh installs) driven by selenium, against the real
server process on a tiny random-weight checkpoint.

The reference for what the page shows is the server itself: the same conversation sent
without streaming at temperature 0 must give the text the page assembled from SSE chunks.
"""
from __future__ import annotations

import re
import shutil
import time

import httpx
import numpy as np
import pytest

from checkpoints import cached_checkpoint
from server_process import MODEL_NAME, ServerProcess

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PAGE_MAX_MODEL_LEN = 8192     # room for a reply long enough to stop half-way (CPU decode is fast)
SYSTEM = "You are a helpful assistant."   # the page's default system prompt
WINDOW = (500, 900)           # a narrow window (headless Chromium's narrowest)

# Watches the last assistant reply and records its length at every change, so a test can
# tell text that streamed in from text that appeared at once.
RECORD_GROWTH = """
window.__lengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant .content');
  if (replies.length) window.__lengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium(), shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("headless Chromium not installed: needs Debian's chromium and "
                    "chromium-driver (scripts/setup.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as e:
        pytest.skip(f"headless Chromium cannot start on this machine: {(e.msg or str(e)).splitlines()[0]}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat_server():
    path = cached_checkpoint("llama", max_position_embeddings=PAGE_MAX_MODEL_LEN)
    proc = ServerProcess(path, "--max-model-len", PAGE_MAX_MODEL_LEN, "--num-kv-blocks", 1024)
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.output()


def _state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def _replies(driver) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .content')].map(e => e.textContent)")


def _set(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def _send(driver, text: str) -> None:
    _set(driver, "prompt", text)
    driver.find_element(By.ID, "send").click()


def _open(driver, server) -> None:
    driver.get(server.url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == MODEL_NAME)
    driver.execute_script(RECORD_GROWTH)


def _reference(server, messages, max_tokens: int) -> dict:
    """The server's own non-streamed answer to the same conversation."""
    resp = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_page_streams_replies_and_keeps_the_conversation(browser, chat_server, tmp_path):
    _open(browser, chat_server)
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 40)
    _send(browser, "Hello there")
    WebDriverWait(browser, 60).until(lambda d: _state(d) == "idle" and _replies(d)[-1])
    first = _replies(browser)[-1]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    ref = _reference(chat_server, messages, 40)
    assert first == ref["choices"][0]["message"]["content"]
    growth = browser.execute_script("return window.__lengths")
    assert len(set(growth)) >= 3, f"the reply did not stream in: lengths seen {growth}"
    stats = browser.find_element(By.ID, "stats").text
    assert re.match(rf"{ref['usage']['completion_tokens']} tokens · [0-9.]+ tok/s", stats), stats

    # The second turn carries the first: the server sees system, user, assistant, user.
    _send(browser, "And then?")
    WebDriverWait(browser, 60).until(lambda d: _state(d) == "idle" and len(_replies(d)) == 2
                                     and _replies(d)[-1])
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert _replies(browser)[-1] == _reference(chat_server, messages, 40)["choices"][0]["message"]["content"]
    _check_screenshot(browser, tmp_path / "chat.png", first)


def _check_screenshot(driver, path, reply: str) -> None:
    """The screenshot is the narrow window, not blank, with dark text pixels where the
    conversation is, and the page's text is the reply the server sent."""
    from PIL import Image
    driver.save_screenshot(str(path))
    image = Image.open(path).convert("L")
    ratio = driver.execute_script("return window.devicePixelRatio")
    assert image.size[0] <= WINDOW[0] * ratio and image.size[1] > 300 * ratio
    assert image.getextrema()[1] - image.getextrema()[0] > 128, "blank screenshot"
    log = driver.find_element(By.ID, "log").rect
    box = [int(v * ratio) for v in (log["x"], log["y"], log["x"] + log["width"], log["y"] + log["height"])]
    dark = int((np.asarray(image.crop(box)) < 110).sum())
    assert dark > 200, f"no text drawn in the conversation area ({dark} dark pixels)"
    assert reply in driver.find_element(By.ID, "log").get_attribute("textContent")
    assert "USER" in driver.find_element(By.ID, "log").text   # the role labels are drawn


def _metric(server, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_stop_button_aborts_the_stream(browser, chat_server):
    _open(browser, chat_server)
    max_tokens = PAGE_MAX_MODEL_LEN - 100
    _set(browser, "temperature", 0.7)
    _set(browser, "max-tokens", max_tokens)
    _set(browser, "extra", '{"ignore_eos": true}')        # no early end: a long stream
    length_done = _metric(chat_server, "fastllm:request_success_total{finished_reason=length}")
    _send(browser, "Count to a thousand")
    WebDriverWait(browser, 60).until(lambda d: _replies(d) and _replies(d)[-1])
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda d: _state(d) == "idle")
    notes = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")
    assert notes and notes[-1].text == "stopped"
    stopped_at = len(_replies(browser)[-1])
    # The server dropped the request: nothing running, every KV block back, and it never
    # finished by length; its access-log line counts fewer tokens than it was asked for.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = chat_server.metrics()
        if m.get("fastllm:num_requests_running") == 0 and m.get("fastllm:kv_cache_blocks_used") == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the server still runs the stopped request: {m}")
    assert _metric(chat_server, "fastllm:request_success_total{finished_reason=length}") == length_done
    lines = [l for l in chat_server.output().splitlines() if '"POST /v1/chat/completions"' in l]
    generated = int(re.search(r"generated_tokens=(\d+)", lines[-1]).group(1))
    assert 0 < generated < max_tokens, lines[-1]
    time.sleep(0.5)
    assert len(_replies(browser)[-1]) == stopped_at, "text kept arriving after stop"
    assert browser.find_element(By.ID, "send").is_enabled()


def test_page_shows_the_servers_error(browser, chat_server):
    _open(browser, chat_server)
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", PAGE_MAX_MODEL_LEN * 4)      # over max_model_len: a 400
    _send(browser, "Hi")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    resp = httpx.post(chat_server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL_NAME, "max_tokens": PAGE_MAX_MODEL_LEN * 4, "temperature": 0, "stream": True,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]})
    assert resp.status_code == 400
    shown = browser.find_element(By.CSS_SELECTOR, ".msg.error .content").text
    request_id = re.compile(r"chatcmpl-[0-9a-f]+")       # differs between the two requests
    assert request_id.sub("ID", shown) == request_id.sub("ID", f"HTTP 400: {resp.json()['error']['message']}")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hi"   # kept to retry
    assert _state(browser) == "idle"
