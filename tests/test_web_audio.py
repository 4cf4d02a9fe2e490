"""Audio on the web chat page, end to end: headless Chromium (the system's `chromium`, driven by Playwright)
opens the page `pocketlm serve` serves for a tiny speech model (test_speech.py's tone "words", trained here
in seconds) and sends a picked WAV (the right digit streams back), a microphone recording (Chromium's fake
microphone playing an espeak-ng "seven"), and a dropped WebM/Opus file the page re-encodes as WAV; a clip over
the server's 30 s, a clip over the model's 0.8 s (the server's 400 shows in the conversation) and a refused
microphone each show their message. Saves a screenshot to $POCKETLM_SCREENSHOT_DIR when set."""

import base64
import io
import os
import re
import shutil
import subprocess
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_speech import CFG, DIGITS, ask, b64, clips_dir, tone_word, wav_bytes  # noqa: F401 (clips_dir: a fixture)
from tiny_lm import running_server

from pocketlm.model.speech import SpeechConfig
from pocketlm.train import speech_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Chromium: apt-get install chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
QUESTION = "Which digit is spoken?"

# plays a WAV (base64) into a MediaRecorder and drops the WebM/Opus it writes on the chat, as a person
# dragging in a file that is not a WAV would
DROP_WEBM = """async (b64) => {
  const ctx = new AudioContext();
  const buffer = await ctx.decodeAudioData(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer);
  const sink = ctx.createMediaStreamDestination();
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(sink);
  const rec = new MediaRecorder(sink.stream, {mimeType: "audio/webm;codecs=opus"});
  const chunks = [];
  rec.ondataavailable = (e) => chunks.push(e.data);
  const stopped = new Promise((resolve) => { rec.onstop = resolve; });
  source.onended = () => setTimeout(() => rec.stop(), 150);
  rec.start();
  source.start();
  await stopped;
  await ctx.close();
  const dt = new DataTransfer();
  dt.items.add(new File(chunks, "zero.webm", {type: "audio/webm"}));
  document.querySelector("main.chat").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


@pytest.fixture(scope="module")
def server(clips_dir, tmp_path_factory):
    """test_speech.py's recipe with fewer steps: all of its held-out tone voices right in ~5 s of training."""
    threads = torch.get_num_threads()
    try:
        recipe = speech_recipe.SpeechRecipe(threads=1, stage0_steps=100, stage0_batch=32, stage0_lr=3e-3,
                                            stage1_steps=20, stage2_steps=120, chat_lr=1e-2, noise_snr_db=20,
                                            max_shift_s=0.1)
        out = tmp_path_factory.mktemp("speech") / "digits"
        speech_recipe.run_recipe(out, clips_dir, SpeechConfig(**CFG), recipe, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    with running_server(out, "--max-batch", "2") as url:
        yield url


def reply_to(server, clip: bytes) -> str:
    r = httpx.post(server + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": ask(b64(clip)), "max_tokens": 3, "temperature": 0})
    return r.json()["choices"][0]["message"]["content"].strip()


def read_part(part) -> tuple[int, int, int, np.ndarray]:
    """(rate, channels, bytes per sample, samples in [-1, 1]) of an input_audio part, read as the server does."""
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"], validate=True))) as f:
        x = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
        return f.getframerate(), f.getnchannels(), f.getsampwidth(), x


def spoken_seven(path: Path) -> Path:
    """The fake microphone's clip: espeak-ng saying "seven", or a tone "seven" where it is not installed."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "seven"], check=True, capture_output=True)
    else:
        path.write_bytes(wav_bytes(tone_word(7, np.random.default_rng(5))))
    return path


def test_the_page_sends_picked_recorded_and_dropped_audio(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    rng = np.random.default_rng(123)  # voices the recipe never heard, at 22.05 kHz: sent as they are
    clips = {d: [wav_bytes(tone_word(d, rng), rate=22050) for _ in range(4)] for d in DIGITS}
    seven = next(c for c in clips[7] if reply_to(server, c).startswith("7"))
    zero = next(c for c in clips[0] if reply_to(server, c).startswith("0"))
    (tmp_path / "seven.wav").write_bytes(seven)
    (tmp_path / "long.wav").write_bytes(wav_bytes(np.zeros(31 * 8000), rate=8000))  # 31 s: over the server's 30
    (tmp_path / "noise.wav").write_bytes(wav_bytes(np.random.default_rng(2).normal(0, 0.3, 16000 * 2)))  # 2 s > 0.8
    mic = spoken_seven(tmp_path / "mic.wav")
    sent, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=[*ARGS, f"--use-file-for-fake-audio-capture={mic}"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.on("pageerror", lambda e: errors.append(e))
            page.goto(server)
            expect(page.locator("#model-name")).to_have_text("tiny")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "3")
            chips, note = page.locator("#audio-clips .clip-chip"), page.locator("#audio-note")

            def send(text=QUESTION):
                page.fill("#input", text)
                page.press("#input", "Enter")
                expect(page.locator(".msg.user").last.locator("audio")).to_have_count(1)  # playable in the bubble
                expect(chips).to_have_count(0)
                last = page.locator(".msg.assistant").last
                expect(last).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=60_000)  # a reply, or an error
                return last, sent[-1]["messages"][-1]["content"]

            # a) a picked WAV goes out byte for byte; the model's digit streams back
            page.set_input_files("#audio-input", str(tmp_path / "seven.wav"))
            expect(chips).to_have_count(1)
            expect(chips).to_contain_text("seven.wav")
            reply, parts = send()
            assert base64.b64decode(parts[0]["input_audio"]["data"]) == seven
            assert parts[0]["input_audio"]["format"] == "wav" and parts[1] == {"type": "text", "text": QUESTION}
            assert reply.locator(".bubble").text_content().strip().startswith("7")
            assert sent[-1]["stream"] is True

            # b) the microphone: a press starts, a second one stops; a 16 kHz mono 16-bit WAV of the voice goes out
            page.click("#record")
            expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
            page.wait_for_function("parseFloat(document.getElementById('audio-note').textContent.slice(11)) >= 1.2",
                                   timeout=15_000)
            page.click("#record")
            expect(chips).to_have_count(1)
            expect(chips).to_contain_text("recording 1")
            page.set_input_files("#audio-input", str(tmp_path / "seven.wav"))  # a second clip waits beside it
            expect(chips).to_have_count(2)
            if os.environ.get("POCKETLM_SCREENSHOT_DIR"):  # the first exchange, and two clips waiting
                out = Path(os.environ["POCKETLM_SCREENSHOT_DIR"])
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / "chat-audio.png"))
            chips.nth(1).locator(".remove").click()
            page.click("#new-chat")  # the waiting clip stays; the first exchange goes
            expect(chips).to_have_count(1)
            reply, parts = send()
            assert len(sent[-1]["messages"]) == 1
            rate, channels, width, x = read_part(parts[0])
            assert (rate, channels, width) == (16000, 1, 2) and 1.1 <= len(x) / rate < 4
            assert float(np.sqrt(np.mean(x ** 2))) > 0.01, "the recording is silent"
            assert reply.locator(".bubble").text_content().strip()  # a digit, or the model's limit if the loop ran long

            # c) a WebM/Opus file dropped on the chat is decoded and re-encoded as 16 kHz WAV; the right digit back
            page.click("#new-chat")
            page.evaluate(DROP_WEBM, base64.b64encode(zero).decode())
            expect(chips).to_have_count(1)
            expect(chips).to_contain_text("zero.webm")
            reply, parts = send()
            rate, channels, width, x = read_part(parts[0])
            assert (rate, channels, width) == (16000, 1, 2)
            assert abs(len(x) / rate - len(zero) / 2 / 22050) < 0.3 and float(np.abs(x).max()) > 0.1
            assert reply.locator(".bubble").text_content().strip().startswith("0")

            # limits: over the server's 30 s is refused on the page; over the model's 0.8 s the server's 400 shows
            page.click("#new-chat")
            page.set_input_files("#audio-input", str(tmp_path / "long.wav"))
            expect(note).to_have_text("long.wav is 31.0 s long; the server takes clips of up to 30 s")
            expect(chips).to_have_count(0)
            page.set_input_files("#audio-input", str(tmp_path / "noise.wav"))
            expect(chips).to_have_count(1)
            expect(note).to_be_hidden()
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            error = page.locator(".msg.assistant.error .bubble")
            expect(error).to_contain_text("this model takes at most 0.8 s", timeout=60_000)
            expect(page.locator(".msg.user audio")).to_have_count(1)

            # a refused microphone says so
            page.evaluate("() => { navigator.mediaDevices.getUserMedia = () => Promise.reject("
                          "new DOMException('denied', 'NotAllowedError')); }")
            page.click("#record")
            expect(note).to_contain_text("the microphone permission was refused")
            expect(page.locator("#record")).to_have_attribute("aria-pressed", "false")
            assert not errors, errors
        finally:
            browser.close()
