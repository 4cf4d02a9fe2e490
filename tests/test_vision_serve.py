"""Images through the public faces: `pocketlm serve` with the official openai client (an image part in,
the right digit out, on a tiny vision model trained here in seconds), the media fuzz list (every bad
image a 4xx, never a 5xx), and `pocketlm generate --image`."""

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from tiny_lm import in_process, running_server

from pocketlm.data import images as image_data
from pocketlm.errors import PocketLMError
from pocketlm.infer.generate import generate, load_engine
from pocketlm.model import save_checkpoint
from pocketlm.model.vision import VisionConfig, VisionLM, prepare_images
from pocketlm.serve.app import create_app
from pocketlm.serve.schemas import IMAGE_PLACEHOLDER
from pocketlm.train.vlm import QUESTION, ChatRows, answer, encoder_features, tiny_text_model, train_chat, train_encoder

CLASSES = (0, 1, 7)  # three digits that look unalike: a few steps tell them apart
CFG = VisionConfig(image_size=16, patch_size=4, width=48, depth=1, heads=2, shuffle=2, projector_hidden=64)
ROOT = Path(__file__).resolve().parents[1]


def _digits():
    x, y = image_data.load_mnist_train_5k()
    keep = np.isin(y, CLASSES)
    x, y = x[keep], y[keep]
    return x, np.array([CLASSES.index(v) for v in y])


def _png(array, mode="L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def data_url(png: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A 3-class digit model: stage 0 (encoder), then projector and LM on the question rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _digits()
        train_x, train_y, test_x, test_y = x[:-30], y[:-30], x[-30:], y[-30:]
        pixels, labels = prepare_images(train_x, CFG), torch.as_tensor(train_y)
        replies = [answer(d) for d in CLASSES]
        lm, tok = tiny_text_model([QUESTION, *replies] * 20, n_embd=48)
        torch.manual_seed(0)
        vlm = VisionLM(lm, CFG)
        train_encoder(vlm, [(pixels, labels)], steps=80, batch_size=32, lr=3e-3, shift=1, log=lambda s: None)
        rows = ChatRows.build(tok, QUESTION, replies, CFG.tokens_per_image)
        train_chat(vlm, [(rows, encoder_features(vlm, pixels), labels)], steps=80, train_lm=True, batch_size=32,
                   lr=1e-2, log=lambda s: None)
        out = vlm.eval().save(tmp_path_factory.mktemp("vlm") / "digits", tok)
    finally:
        torch.set_num_threads(threads)
    return out, test_x, test_y


@pytest.fixture(scope="module")
def server(vlm_dir):
    with running_server(vlm_dir[0], "--max-batch", "4") as url:
        yield url


def ask(url: str, text: str = QUESTION.removeprefix(IMAGE_PLACEHOLDER + "\n")) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_an_image_part_in_the_right_digit_out(server, vlm_dir):
    _, test_x, test_y = vlm_dir
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    right, prompt_tokens = 0, set()
    for image, label in zip(test_x, test_y):
        r = client.chat.completions.create(model="tiny", messages=ask(data_url(_png(image))), max_tokens=3,
                                           temperature=0)
        right += r.choices[0].message.content.strip().startswith(str(CLASSES[label]))
        prompt_tokens.add(r.usage.prompt_tokens)
    assert right >= 0.8 * len(test_y), f"{right}/{len(test_y)} right"
    # the image's positions count: the same chat as text only is tokens_per_image shorter (+ the placeholder's text)
    text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What digit is this?"}],
                                          max_tokens=1, temperature=0)
    (n,) = prompt_tokens
    assert n >= text.usage.prompt_tokens + CFG.tokens_per_image - 1


def _bomb() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")  # 25M pixels in a few KB
    return buf.getvalue()


def test_bad_images_are_4xx_never_5xx(server):
    png = _png(np.zeros((28, 28), np.uint8))
    good = data_url(png)
    bad_urls = {
        "remote": "https://example.com/cat.png",
        "http": "http://127.0.0.1:1/x.png",
        "file": "file:///etc/passwd",
        "no scheme": "cat.png",
        "empty": "",
        "corrupt base64": "data:image/png;base64,@@@not base64@@@",
        "not base64 encoded": "data:image/png," + "A" * 20,
        "wrong type": data_url(png, "text/plain"),
        "svg": data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        "not an image": data_url(b"hello world, not a picture"),
        "truncated": data_url(png[: len(png) // 2]),
        "bomb": data_url(_bomb()),
        "huge header": data_url(png[:16] + (10**5).to_bytes(4, "big") * 2 + png[24:]),
    }
    bodies = {name: {"model": "tiny", "messages": ask(url)} for name, url in bad_urls.items()}
    bodies["too many"] = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": good}}] * 9}]}
    bodies["in a system message"] = {"model": "tiny", "messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": good}}]},
        {"role": "user", "content": "hi"}]}
    bodies["typed placeholder too"] = {"model": "tiny", "messages": ask(good, "<image> what is this?")}
    bodies["url not a string"] = {"model": "tiny", "messages": ask(123)}
    bodies["no image_url"] = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    bodies["unknown part"] = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "video"}]}]}
    bodies["too large"] = {"model": "tiny", "messages": ask("data:image/png;base64," + "A" * (3 * 2**20))}
    statuses = {}
    for name, body in bodies.items():
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
        statuses[name] = r.status_code
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        if r.status_code != 413:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
    assert statuses["remote"] == statuses["bomb"] == statuses["corrupt base64"] == 400
    # and the server still answers a good one
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": ask(good), "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200


def test_an_image_to_a_text_only_model_is_a_400(tmp_path):
    lm, tok = tiny_text_model([QUESTION] * 5)
    engine = load_engine(save_checkpoint(tmp_path / "text", lm.eval(), tok), dtype="fp32")
    assert engine.vision is None
    with in_process(create_app(engine, "tiny")) as client:
        r = client.post("/v1/chat/completions",
                        json={"model": "tiny", "messages": ask(data_url(_png(np.zeros((8, 8), np.uint8))))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_supported"
    assert "text-only" in r.json()["error"]["message"]


def test_generate_with_an_image(vlm_dir, tmp_path):
    path, test_x, test_y = vlm_dir
    file = tmp_path / "digit.png"
    file.write_bytes(_png(test_x[0]))
    cmd = [sys.executable, "-m", "pocketlm.cli", "generate", "--model", str(path), "--image", str(file),
           "--prompt", "What digit is this?", "--temperature", "0", "--max-new-tokens", "3", "--dtype", "fp32"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(CLASSES[test_y[0]]))
    # the library verb: a file that is no image is an error naming it
    file.write_bytes(b"not a picture")
    with pytest.raises(PocketLMError, match="digit.png"):
        generate(path, "What digit is this?", image=file, dtype="fp32", out=io.StringIO())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]

# drops (or pastes) a PNG given as base64 on the page, as a person dragging a file in would
DROP = """([where, b64, kind]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], "digit.png", {type: "image/png"}));
  const el = document.querySelector(where);
  if (kind === "drop") el.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
  else el.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Chromium: apt-get install chromium")
def test_the_page_sends_picked_pasted_and_dropped_images(server, vlm_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, test_x, test_y = vlm_dir
    # three test digits the model reads right through the API (it is tiny: not all are)
    right = [i for i in range(len(test_y)) if httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ask(data_url(_png(test_x[i]))), "max_tokens": 3, "temperature": 0}
    ).json()["choices"][0]["message"]["content"].strip().startswith(str(CLASSES[test_y[i]]))][:3]
    pngs = [_png(test_x[i]) for i in right]
    (tmp_path / "digit.png").write_bytes(pngs[0])
    sent = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(server)
            expect(page.locator("#model-name")).to_have_text("tiny")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "3")
            question = QUESTION.removeprefix(IMAGE_PLACEHOLDER + "\n")
            ways = [lambda: page.set_input_files("#image-input", str(tmp_path / "digit.png")),
                    lambda: page.evaluate(DROP, ["#input", base64.b64encode(pngs[1]).decode(), "paste"]),
                    lambda: page.evaluate(DROP, ["main.chat", base64.b64encode(pngs[2]).decode(), "drop"])]
            for n, attach in enumerate(ways):
                page.click("#new-chat")
                attach()
                expect(page.locator("#attachments img")).to_have_count(1)
                page.fill("#input", question)
                page.press("#input", "Enter")
                expect(page.locator(".msg.user .bubble img")).to_have_count(1)  # shown in the conversation
                expect(page.locator("#attachments img")).to_have_count(0)
                reply = page.locator(".msg.assistant")
                expect(reply.locator(".meta")).not_to_have_text("", timeout=60_000)
                assert reply.locator(".bubble").text_content().strip().startswith(str(CLASSES[test_y[right[n]]])), n
                parts = sent[n]["messages"][-1]["content"]
                assert parts[0]["type"] == "image_url" and parts[1] == {"type": "text", "text": question}
                assert base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1]) == pngs[n]
            if os.environ.get("POCKETLM_SCREENSHOT_DIR"):
                page.screenshot(path=str(Path(os.environ["POCKETLM_SCREENSHOT_DIR"]) / "chat_image.png"))
        finally:
            browser.close()


def test_chat_with_an_image(vlm_dir, tmp_path):
    """`pocketlm chat --image`: the image goes with the first message and stays in the conversation."""
    from pocketlm.infer.generate import chat_repl, image_pixels
    from pocketlm.infer.sampling import SamplingParams

    path, test_x, test_y = vlm_dir
    file = tmp_path / "digit.png"
    file.write_bytes(_png(test_x[0]))
    engine = load_engine(path, dtype="fp32")
    lines = iter(["What digit is this?", "<image> again?", "/quit"])
    out = io.StringIO()
    history = chat_repl(engine, SamplingParams(max_tokens=3, temperature=0), read=lambda _: next(lines), out=out,
                        pixels=image_pixels(engine, path, [file]))
    assert history[0]["content"] == QUESTION and history[1]["content"].strip().startswith(str(CLASSES[test_y[0]]))
    assert len(history) == 2 and "placeholder" in out.getvalue()  # a typed <image> beside the real one: refused
