"""The web page's memory, end to end: `pocketlm serve --data-dir` with two users, headless Chromium
(Playwright, the system's `chromium`, as in test_web.py) on the page with a user's key. The Memory panel
shows that user's memories and never another's (nor runs their text as HTML); "remember that …" in a chat
adds a memory shown under the reply with an Undo that removes it (and undoes updates and forgets); the
panel adds, edits, disables, deletes (with Undo) and exports; the temporary-chat switch sends
`"memory": false`, the prompt then holds no memory and nothing is written. Saves a screenshot of the page
with the panel open (memory-panel.png, to $POCKETLM_SCREENSHOT_DIR when set)."""

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from test_web import ARGS, CHROMIUM
from tiny_lm import running_server, tiny_lm

from pocketlm.infer.generate import encode_chat
from pocketlm.memory import user_add
from pocketlm.model import save_checkpoint

ADMIN = "admin-key-for-web-tests-0123456789"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Chromium: apt-get install chromium")
XSS = '<img src=x onerror="window.pwned=1">Bob\'s <b>bold</b> note'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = tiny_lm()
    data = tmp_path_factory.mktemp("users")
    keys = {name: user_add(name, data) for name in ("alice", "bob", "cy")}
    ckpt = save_checkpoint(tmp_path_factory.mktemp("web") / "tiny", model, tok)
    with running_server(ckpt, "--max-batch", "2", "--data-dir", str(data), "--api-key", ADMIN) as url:
        for user, text, kind in (("alice", "I like green tea", "preference"), ("alice", "My locker code is 4312", "fact"),
                                 ("bob", XSS, "fact"), ("bob", "My bank PIN is 9921", "fact"),
                                 ("bob", "I like bob-only jazz", "preference")):
            api(url, ADMIN, "POST", f"/v1/users/{user}/memories", {"text": text, "kind": kind})
        yield url, keys, tok


def api(url, key, method, path, body=None):
    r = httpx.request(method, url + path, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code < 300, r.text
    return r.json()


def memories(url, user):
    return api(url, ADMIN, "GET", f"/v1/users/{user}/memories")["data"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("the browser test needs Chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    yield context.new_page()
    context.close()


def sign_in(page, url, key):
    """Open the page and type the key into Settings, as a person would; then open the Memory panel."""
    page.goto(url)
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # the key counts once the field is left (its change event)
    expect(page.locator("#model-name")).to_have_text("tiny")
    expect(page.locator("#toggle-memory")).to_be_visible()
    page.click("#toggle-memory")
    expect(page.locator("#memory-panel")).to_be_visible()
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "4")


def chat(page, text, n):
    """Send `text`; wait for the n-th reply (0-based) to finish; its element."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").nth(n)
    expect(reply.locator(".meta")).to_contain_text("tokens", timeout=60_000)
    return reply


def panel_texts(page):
    return page.locator("#memory-list .memory-text").all_text_contents()


def screenshot(page, tmp_path, name):
    page.wait_for_timeout(200)
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    if os.environ.get("POCKETLM_SCREENSHOT_DIR"):
        out = Path(os.environ["POCKETLM_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)


def test_whoami_tells_a_key_its_own_user(setup):
    url, keys, _ = setup
    assert api(url, keys["alice"], "GET", "/v1/users/me") == {"object": "user", "name": "alice", "admin": False}
    assert api(url, ADMIN, "GET", "/v1/users/me") == {"object": "user", "name": None, "admin": True}
    for headers in ({"Authorization": "Bearer plm-not-a-key"}, {}):
        r = httpx.get(url + "/v1/users/me", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_an_update_reports_the_memory_before_it_for_undo(setup):
    url, keys, _ = setup
    say = lambda text: api(url, keys["cy"], "POST", "/v1/chat/completions", {  # noqa: E731
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": text}]})["memory_updates"]
    mid = say("My name is Ana.")[0]["id"]
    api(url, keys["cy"], "PATCH", f"/v1/users/cy/memories/{mid}", {"enabled": False})
    (update,) = say("My name is Bea.")
    assert update == {"id": mid, "action": "update", "text": "The user's name is Bea.", "kind": "fact",
                      "previous": {"text": "The user's name is Ana.", "kind": "fact", "enabled": False}}


@needs_chromium
def test_the_panel_shows_the_keys_memories_and_never_anothers(setup, page):
    url, keys, _ = setup
    bodies = []
    page.on("response", lambda r: bodies.append(r) if "/v1/" in r.url else None)
    sign_in(page, url, keys["alice"])
    expect(page.locator("#memory-user")).to_have_text("· alice")
    expect(page.locator("#memory-list .memory-item")).to_have_count(len(memories(url, "alice")))
    assert sorted(panel_texts(page)) == sorted(m["text"] for m in memories(url, "alice"))
    kinds = page.locator("#memory-list .kind").all_text_contents()
    assert sorted(kinds) == sorted(m["kind"] for m in memories(url, "alice"))
    seen = page.content() + "".join(r.text() for r in bodies if r.request.method == "GET")
    assert "9921" not in seen and "bob-only" not in seen and "Bob's" not in seen

    page.fill("#api-key", keys["bob"])  # the same page under bob's key: bob's memories only
    page.press("#api-key", "Tab")
    expect(page.locator("#memory-user")).to_have_text("· bob")
    expect(page.locator("#memory-list .memory-item")).to_have_count(3)
    assert "4312" not in page.content() and "green tea" not in page.content()
    assert XSS in panel_texts(page)  # shown as text: no <img> made, its onerror never ran
    assert page.locator("#memory-list img, #memory-list b").count() == 0 and page.evaluate("window.pwned") is None

    page.fill("#api-key", ADMIN)  # the admin key has no memories of its own: the panel says so
    page.press("#api-key", "Tab")
    expect(page.locator("#memory-status")).to_contain_text("admin key")
    expect(page.locator("#memory-list .memory-item")).to_have_count(0)
    assert not page.locator("#temporary-switch").is_visible()


@needs_chromium
def test_remember_in_chat_adds_a_memory_with_undo(setup, page, tmp_path):
    url, keys, _ = setup
    sign_in(page, url, keys["alice"])
    reply = chat(page, "Remember that my bike is blue.", 0)
    note = reply.locator(".memory-note")
    expect(note).to_have_count(1)
    expect(note).to_contain_text("Remembered")
    expect(note.locator(".memory-note-text")).to_have_text("My bike is blue")
    expect(page.locator("#memory-list .memory-text", has_text="My bike is blue")).to_have_count(1)
    assert [m for m in memories(url, "alice") if m["text"] == "My bike is blue"]

    page.click("#toggle-settings")  # the picture: chat, the note with Undo, and the panel
    screenshot(page, tmp_path, "memory-panel.png")

    note.locator("button.undo").click()  # undo an add: the memory is deleted
    expect(note).to_contain_text("Undone")
    expect(page.locator("#memory-list .memory-text", has_text="My bike is blue")).to_have_count(0)
    assert not [m for m in memories(url, "alice") if "bike" in m["text"]]

    chat(page, "My name is Ana.", 1)
    second = chat(page, "My name is Bea.", 2).locator(".memory-note")  # an update: undo puts Ana back
    expect(second).to_contain_text("Updated memory")
    second.locator("button.undo").click()
    expect(second).to_contain_text("Undone")
    expect(page.locator("#memory-list .memory-text", has_text="The user's name is Ana.")).to_have_count(1)
    assert [m["text"] for m in memories(url, "alice") if "name is" in m["text"]] == ["The user's name is Ana."]

    forgot = chat(page, "Forget my name.", 3).locator(".memory-note")  # a delete: undo adds it back
    expect(forgot).to_contain_text("Forgot")
    expect(page.locator("#memory-list .memory-text", has_text="name is")).to_have_count(0)
    forgot.locator("button.undo").click()
    expect(page.locator("#memory-list .memory-text", has_text="The user's name is Ana.")).to_have_count(1)
    assert [(m["text"], m["kind"]) for m in memories(url, "alice") if "name is" in m["text"]] == [
        ("The user's name is Ana.", "fact")]


@needs_chromium
def test_the_panel_adds_edits_disables_deletes_and_exports(setup, page):
    url, keys, _ = setup
    sign_in(page, url, keys["alice"])
    page.fill("#memory-text", "I prefer short answers")
    page.select_option("#memory-kind", "preference")
    page.click("#memory-add button[type=submit]")
    item = page.locator("#memory-list .memory-item", has_text="I prefer short answers")
    expect(item).to_have_count(1)
    expect(item.locator(".kind")).to_have_text("preference")
    mid = int(item.get_attribute("data-id"))

    item.locator(".memory-edit").click()
    page.fill(".memory-edit-text", "I prefer very short answers")
    page.click(".memory-save")
    item = page.locator(f"#memory-list .memory-item[data-id='{mid}']")
    expect(item.locator(".memory-text")).to_have_text("I prefer very short answers")
    item.locator(".memory-enabled").uncheck()
    expect(item).to_have_class("memory-item disabled")
    held = {m["id"]: m for m in memories(url, "alice")}[mid]
    assert (held["text"], held["kind"], held["enabled"]) == ("I prefer very short answers", "preference", False)

    item.locator(".memory-delete").click()
    expect(item).to_have_count(0)
    assert mid not in {m["id"] for m in memories(url, "alice")}
    page.locator(".toast", has_text="Deleted").locator("button.undo").click()  # the toast's Undo puts it back, disabled as it was
    restored = page.locator("#memory-list .memory-item", has_text="I prefer very short answers")
    expect(restored).to_have_count(1)
    assert [(m["kind"], m["enabled"]) for m in memories(url, "alice") if m["text"] == "I prefer very short answers"] == [
        ("preference", False)]

    with page.expect_download() as download:
        page.click("#memory-export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["user"] == "alice" and download.value.suggested_filename == "pocketlm-alice-export.json"
    assert [m["text"] for m in exported["memories"]] == [m["text"] for m in memories(url, "alice")]


@needs_chromium
def test_temporary_chat_reads_and_writes_nothing(setup, page, tmp_path):
    url, keys, tok = setup
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    sign_in(page, url, keys["alice"])
    question = "What is my locker code?"
    plain = len(encode_chat(tok, [{"role": "user", "content": question}]))
    normal = chat(page, question, 0)
    assert int(normal.get_attribute("data-prompt-tokens")) > plain  # memory joined the prompt
    assert "memory" not in sent[0]

    page.click("#new-chat")
    expect(page.locator("#temp-banner")).to_be_hidden()
    page.click("#temporary-switch")
    expect(page.locator("#temp-banner")).to_be_visible()
    expect(page.locator("#temp-banner")).to_contain_text("nothing is read")
    before = memories(url, "alice")
    told = "Remember that my locker is red."
    reply = chat(page, told, 0)
    assert sent[1]["memory"] is False
    assert int(reply.get_attribute("data-prompt-tokens")) == len(encode_chat(tok, [{"role": "user", "content": told}]))
    expect(reply.locator(".meta")).to_contain_text("temporary chat")
    assert reply.locator(".memory-note").count() == 0 and memories(url, "alice") == before
    asked = chat(page, question, 1)  # the second turn of the temporary chat: still no memory in the prompt
    history = [{"role": "user", "content": told}, {"role": "assistant", "content": reply.locator(".bubble").text_content()},
               {"role": "user", "content": question}]
    assert int(asked.get_attribute("data-prompt-tokens")) == len(encode_chat(tok, history))
    assert memories(url, "alice") == before
    screenshot(page, tmp_path, "memory-temporary.png")

    page.click("#temporary-switch")  # off again: memory is back
    page.click("#new-chat")
    assert int(chat(page, question, 0).get_attribute("data-prompt-tokens")) > plain
    assert "memory" not in sent[-1]
