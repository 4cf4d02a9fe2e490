"""Speech through the public faces: log-mel and WAV reading checked against known signals, the speech
recipe on a folder of clips, `pocketlm serve` with the official openai client (an input_audio part in,
the right digit out), every bad audio part a 4xx, and `generate --audio`. The clips are synthetic
"words" (two tones each, a different pair per digit) spoken by "voices" (pitch, pace, noise), so the
test needs neither espeak-ng nor recordings; the real spoken digits run in benchmarks/speech_digits.py."""

import base64
import csv
import io
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from tiny_lm import in_process, running_server

from pocketlm.data.speech import AudioDataError, build_spoken_digits, decode_audio_part, load_spoken_digits, read_wav
from pocketlm.errors import InputError, PocketLMError
from pocketlm.infer.generate import generate, load_engine
from pocketlm.model import save_checkpoint
from pocketlm.model.speech import SpeechConfig, load_speech_model, log_mel, mel_filterbank, prepare_clips, speech_tower
from pocketlm.serve.app import create_app
from pocketlm.train import speech_recipe
from pocketlm.train.vlm import tiny_text_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = (0, 1, 7)
TONES = {0: (300, 1400), 1: (900, 500), 7: (1800, 2600)}  # each "word": a first and a second tone, in Hz
CFG = dict(max_seconds=0.8, n_mels=32, width=48, depth=1, heads=2, tokens=2, projector_hidden=64)


def wav_bytes(x: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        if width == 1:
            f.writeframes(np.clip(x * 127 + 128, 0, 255).astype(np.uint8).tobytes())
        else:
            f.writeframes((np.clip(x, -1, 1) * (2 ** (8 * width - 1) - 1)).astype({2: "<i2", 4: "<i4"}[width]).tobytes())
    return buf.getvalue()


def tone_word(digit: int, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """A voice saying a digit: its two tones, shifted in pitch, at its pace, with noise and silence around."""
    pitch, pace = rng.uniform(0.85, 1.18), rng.uniform(0.15, 0.25)
    t = np.arange(int(pace * rate)) / rate
    word = np.concatenate([np.sin(2 * np.pi * f * pitch * t) * np.hanning(len(t)) for f in TONES[digit]])
    clip = np.concatenate([np.zeros(int(rng.uniform(0, 0.1) * rate)), word * rng.uniform(0.2, 0.9), np.zeros(800)])
    return (clip + rng.normal(0, 0.01, len(clip))).astype(np.float32)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    """A folder as python -m pocketlm.data.speech writes one: WAVs and manifest.csv, split by voice."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for n in range(300):
        digit = DIGITS[n % 3]
        split = "train" if n < 240 else "val" if n < 270 else "test"
        (folder / f"c{n}.wav").write_bytes(wav_bytes(tone_word(digit, rng)))
        rows.append({"file": f"c{n}.wav", "label": digit, "word": str(digit), "engine": "tones", "voice": f"v{n}",
                     "split": split, "speed": 0, "pitch": 0})
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def model_dir(clips_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        cfg = SpeechConfig(**CFG)
        recipe = speech_recipe.SpeechRecipe(threads=1, stage0_steps=200, stage0_batch=32, stage0_lr=3e-3,
                                            stage1_steps=40, stage2_steps=120, chat_lr=1e-2, noise_snr_db=20,
                                            max_shift_s=0.1)
        out = tmp_path_factory.mktemp("speech") / "digits"
        result = speech_recipe.run_recipe(out, clips_dir, cfg, recipe, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_log_mel_puts_a_tone_in_its_band():
    cfg = SpeechConfig(n_mels=40)
    t = torch.arange(cfg.samples) / cfg.sample_rate
    mels = log_mel(torch.sin(2 * np.pi * 1000 * t)[None], cfg)
    assert mels.shape == (1, 40, cfg.frames)
    bank = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate)
    expected = int(bank[round(1000 / (cfg.sample_rate / cfg.n_fft))].argmax())  # the filter that peaks at 1 kHz
    assert int(mels[0, :, cfg.frames // 2].argmax()) == expected
    # silence padding is floored, not -inf, and a quiet clip reads like a loud one after prepare_clips
    quiet, loud = prepare_clips([0.01 * np.sin(2 * np.pi * 440 * t[:4000].numpy()),
                                 0.9 * np.sin(2 * np.pi * 440 * t[:4000].numpy())], cfg)
    assert torch.isfinite(quiet).all() and torch.allclose(quiet, loud, atol=1e-4)


def test_read_wav_formats_and_errors():
    t = np.arange(44100) / 44100
    x = 0.5 * np.sin(2 * np.pi * 220 * t)
    stereo = np.stack([x, x], 1).ravel()
    y = read_wav(wav_bytes(stereo, rate=44100, channels=2))
    assert len(y) == 16000 and abs(float(np.abs(y).max()) - 0.5) < 0.01  # one second, resampled, mono
    for width in (1, 4):
        assert abs(float(np.abs(read_wav(wav_bytes(x[:16000], width=width))).max()) - 0.5) < 0.02
    with pytest.raises(AudioDataError, match="clip.wav: not a PCM WAV"):
        read_wav(b"RIFF0000WAVEjunk", "clip.wav")
    with pytest.raises(AudioDataError, match="over the limit of 30 s"):
        read_wav(wav_bytes(np.zeros(31 * 8000), rate=8000))
    with pytest.raises(AudioDataError, match=r"part\.format: only 'wav'"):
        decode_audio_part(base64.b64encode(b"ID3").decode(), "mp3", "part")
    with pytest.raises(AudioDataError, match="base64 data is corrupt"):
        decode_audio_part("@@not base64@@", "wav")
    with pytest.raises(InputError, match="at most 0.8 s"):
        prepare_clips([np.ones(16000) * 0.5], SpeechConfig(**CFG))


def test_the_manifest_is_checked(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,label,split\na.wav,1,holdout\n")
    with pytest.raises(AudioDataError, match="manifest.csv, line 2: split must be"):
        load_spoken_digits(tmp_path)
    with pytest.raises(AudioDataError, match="no manifest"):
        load_spoken_digits(tmp_path / "missing")


def test_the_recipe_learns_the_words_of_unheard_voices(model_dir):
    out, result = model_dir
    assert result["chat_test"] >= 0.9 and result["probe_test"] >= 0.9, result
    assert (out / "speech.safetensors").exists() and not list(out.glob("*.pt"))
    # the saved folder loads back as a model with its speech tower
    engine = load_engine(out, dtype="fp32")
    assert engine.speech is not None and engine.vision is None
    slm, _ = load_speech_model(out)
    assert slm.speech_cfg == SpeechConfig(**CFG)
    (out / "config.json").rename(out / "config.bak")
    try:
        with pytest.raises(PocketLMError):
            load_speech_model(out)
    finally:
        (out / "config.bak").rename(out / "config.json")


def ask(clip_b64: str, fmt: str = "wav", text: str = "Which digit is spoken?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip_b64, "format": fmt}},
                                         {"type": "text", "text": text}]}]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir[0], "--max-batch", "4") as url:
        yield url


def test_an_audio_part_in_the_right_digit_out(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    rng = np.random.default_rng(123)  # voices the recipe never heard
    right, usage = 0, set()
    for n in range(15):
        digit = DIGITS[n % 3]
        r = client.chat.completions.create(model="tiny", messages=ask(b64(wav_bytes(tone_word(digit, rng), rate=22050))),
                                           max_tokens=3, temperature=0)
        right += r.choices[0].message.content.strip().startswith(str(digit))
        usage.add(r.usage.prompt_tokens)
    assert right >= 13, f"{right}/15 right"
    text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Which digit is spoken?"}],
                                          max_tokens=1, temperature=0)
    (n,) = usage  # the clip's positions count in usage
    assert n >= text.usage.prompt_tokens + CFG["tokens"] - 1


def test_bad_audio_is_4xx_never_5xx(server):
    good = b64(wav_bytes(tone_word(0, np.random.default_rng(1))))
    bodies = {
        "mp3": ask(good, "mp3"),
        "corrupt base64": ask("@@@"),
        "not a wav": ask(b64(b"hello, not audio")),
        "truncated": ask(b64(base64.b64decode(good)[:30])),
        "too long": ask(b64(wav_bytes(np.random.default_rng(2).normal(0, 0.3, 16000 * 3)))),
        "silent": ask(b64(wav_bytes(np.zeros(1600)))),
        "data not a string": ask(123),
        "no format": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": good}}]}],
        "in an assistant message": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "input_audio", "input_audio": {"data": good, "format": "wav"}}]}, {"role": "user", "content": "?"}],
        "typed placeholder too": ask(good, text="<audio> what was said?"),
        "audio and an image": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": good, "format": "wav"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
    }
    statuses = {}
    for name, messages in bodies.items():
        r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 2},
                       timeout=60)
        statuses[name] = r.status_code
        assert 400 <= r.status_code < 500 or (name == "silent" and r.status_code == 200), (name, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
    assert statuses["mp3"] == statuses["corrupt base64"] == statuses["too long"] == 400
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": ask(good), "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200


def test_audio_to_a_model_without_a_speech_tower_is_a_400(tmp_path):
    lm, tok = tiny_text_model(["Which digit is spoken?"] * 5)
    path = save_checkpoint(tmp_path / "text", lm.eval(), tok)
    assert speech_tower(path, lm) is None
    engine = load_engine(path, dtype="fp32")
    with in_process(create_app(engine, "tiny")) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ask(b64(wav_bytes(np.zeros(800))))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_not_supported"


def test_generate_with_audio(model_dir, tmp_path):
    path, _ = model_dir
    file = tmp_path / "seven.wav"
    file.write_bytes(wav_bytes(tone_word(7, np.random.default_rng(9))))
    cmd = [sys.executable, "-m", "pocketlm.cli", "generate", "--model", str(path), "--audio", str(file),
           "--prompt", "Which digit is spoken?", "--temperature", "0", "--max-new-tokens", "3", "--dtype", "fp32"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("7")
    file.write_bytes(b"not audio")
    with pytest.raises(PocketLMError, match="seven.wav"):
        generate(path, "Which digit is spoken?", audio=file, dtype="fp32", out=io.StringIO())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                    reason="the spoken digits need espeak-ng and flite: apt-get install espeak-ng flite")
def test_spoken_digits_are_synthesized_and_split_by_voice(tmp_path):
    manifest = build_spoken_digits(tmp_path / "digits", accents=1, log=lambda s: None)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["voice"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())  # a voice is never in two splits
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert all(len({r["label"] for r in group}) == 10 for group in by_split.values())
    assert {r["engine"] for r in by_split["test"]} == {"espeak-ng", "flite"}
    data = load_spoken_digits(tmp_path / "digits")
    waves = data["test"][0]
    assert len(waves) == len(by_split["test"]) and all(0.1 < len(w) / 16000 < 1.5 for w in waves)
    # the words fit the recipe's clip length once trimmed
    assert prepare_clips(waves[:50], SpeechConfig()).shape[0] == 50
    assert build_spoken_digits(tmp_path / "digits") == manifest  # a built set is kept, not rebuilt


def test_python_dash_m_pocketlm_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "pocketlm", "generate", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "--audio" in r.stdout
