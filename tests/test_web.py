"""The web chat page, end to end: headless Chromium (the system's `chromium`, driven by Playwright)
opens the page served by `pocketlm serve`, sends a message, watches the reply stream in, stops a
second reply midway, and saves a screenshot (to $POCKETLM_SCREENSHOT_DIR when set)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from tiny_lm import reference_greedy, running_server, tiny_lm

from pocketlm.infer.generate import encode_chat
from pocketlm.model import save_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Chromium: apt-get install chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# records each text the reply bubble shows, so the test can tell streaming from a reply shown all at once
WATCH = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const b = document.querySelectorAll('.msg.assistant .bubble');
    if (b.length) window.seen.push(b[b.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, tok = tiny_lm()
    ckpt = save_checkpoint(tmp_path_factory.mktemp("web") / "tiny", model, tok)
    with running_server(ckpt, "--max-batch", "2") as url:
        yield url


def test_chat_page_streams_a_reply_and_can_stop_one(server, tmp_path):
    model, tok = tiny_lm()
    system, question = "You are a player in a play.", "Speak, good sir: what news?"
    expected = tok.decode(reference_greedy(model, encode_chat(tok, [{"role": "system", "content": system},
                                                                     {"role": "user", "content": question}]), 120))
    sent = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(server)
            expect(page.locator("#model-name")).to_have_text("tiny")
            page.fill("#system", system)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "120")
            page.evaluate(WATCH)
            page.fill("#input", question)
            page.press("#input", "Enter")

            reply = page.locator(".msg.assistant").first
            expect(reply.locator(".meta")).to_contain_text("120 tokens", timeout=60_000)
            assert reply.locator(".bubble").text_content() == expected
            partial = [t for t in page.evaluate("window.seen") if t and t != expected]
            assert len(set(partial)) >= 3, "the reply appeared at once instead of streaming"
            assert sent[0]["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": question}]
            assert sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 120 and sent[0]["stream"] is True

            # a second turn carries the conversation; Stop ends it early and frees the server's slot
            page.fill("#max-tokens", "700")
            page.fill("#temperature", "0.8")
            page.fill("#input", "Say more.")
            page.press("#input", "Enter")
            second = page.locator(".msg.assistant").nth(1)
            expect(second.locator(".bubble")).not_to_have_text("", timeout=60_000)
            page.click("#send")  # the Send button is the Stop button while a reply streams
            expect(second.locator(".meta")).to_have_text("stopped", timeout=30_000)
            assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
            assert sent[1]["messages"][2]["content"] == expected
            for _ in range(50):
                if httpx.get(server + "/health", timeout=10).json()["running"] == 0:
                    break
                time.sleep(0.1)
            assert httpx.get(server + "/health", timeout=10).json()["running"] == 0

            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            if os.environ.get("POCKETLM_SCREENSHOT_DIR"):
                out = Path(os.environ["POCKETLM_SCREENSHOT_DIR"])
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, out / "chat.png")
        finally:
            browser.close()
