"""The chat page at / in a real headless browser (Debian's chromium, driven by Playwright).

Without the browser or Playwright the tests are skipped, except in CI (CI=true), where
`scripts/install.sh --dev` installs both: there their absence is a failure.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.ci import IN_CI
from tests.server_process import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

try:
    from playwright import sync_api
except ImportError:
    sync_api = None
MISSING = ("no browser: /usr/bin/chromium is missing (apt-get install -y chromium)" if not CHROMIUM.exists() else
           "no Playwright: pip install playwright (no `playwright install`)" if sync_api is None else None)
if MISSING and not IN_CI:
    pytest.skip(MISSING, allow_module_level=True)

# Counts changes of the assistant's text while it streams: more than one means it arrived in pieces.
COUNT_UPDATES = """() => {
  window.replyUpdates = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.closest && r.target.closest('.message.assistant')) window.replyUpdates += 1;
    }
  }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    # 600 new tokens at most: the dragon story must still be streaming when the test clicks Stop (the default model
    # decodes ~190 tok/s since it runs its Q4_1 file as it is: 48 tokens were over before the click); the other
    # questions end at the model's end-of-turn token.
    server = ServerProcess(["--max-seq-length", "1024", "--temperature", "0", "--max-new-tokens", "600"],
                           tmp_path_factory.mktemp("page-server") / "server.log")
    yield server.wait_ready()
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        pytest.fail(f"CI=true, and {MISSING}", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.get_by_text("smollm2-135m").wait_for()  # the page asked /v1/models for the model's name
    yield page
    page.close()


def send(page, text: str):
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def reply(page, n: int):
    """The n-th assistant message (0-based), once it is finished."""
    message = page.locator(".message.assistant").nth(n)
    page.wait_for_function(f"document.querySelectorAll('.message.assistant')[{n}]?.dataset.state === 'done'",
                           timeout=TIMEOUT_MS)
    return message


def test_the_page_streams_an_answer_and_keeps_the_conversation(page):
    page.evaluate(COUNT_UPDATES)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)

    send(page, "What is the capital of France?")
    page.locator(".message.assistant .content").first.filter(has_text="Paris").wait_for()
    first = reply(page, 0).locator(".content").inner_text()
    assert "Paris" in first
    assert page.evaluate("window.replyUpdates") > 1  # the reply grew piece by piece
    assert page.get_by_label("Message").input_value() == ""
    assert page.get_by_role("button", name="Send").is_enabled()

    send(page, "What is the capital of Japan?")
    second = reply(page, 1).locator(".content").inner_text()
    assert "Tokyo" in second
    # The second request carried the whole conversation, the first reply included.
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[-1]["messages"][1]["content"] == first
    assert bodies[-1]["stream"] is True
    assert page.locator(".message.user .content").all_inner_texts() == [
        "What is the capital of France?", "What is the capital of Japan?"]


def test_stop_ends_a_reply_and_new_chat_clears_the_conversation(page, server):
    cancelled = server.log().count("request cancelled")
    send(page, "Write a long story about a dragon.")
    page.locator(".message.assistant .content").first.filter(has_text=re.compile(r"\w")).wait_for()
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("document.querySelector('.message.assistant')?.dataset.state === 'stopped'",
                           timeout=TIMEOUT_MS)
    assert page.get_by_role("button", name="Send").is_enabled()
    deadline = time.monotonic() + 10  # the aborted fetch closed the connection: the server stops generating
    while server.log().count("request cancelled") == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("request cancelled") == cancelled + 1
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".message").count() == 0
