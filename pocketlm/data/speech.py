"""Audio for the speech model: WAV files read with the standard library, and spoken digits
synthesized here with Debian's espeak-ng and flite (no recordings ship with pocketlm).

    python -m pocketlm.data.speech --out runs/spoken_digits      # ~4,000 clips, a manifest.csv beside them

A clip is a 1-D float32 waveform in [-1, 1] at SAMPLE_RATE. `read_wav` takes 8/16/24/32-bit PCM,
any channel count (averaged to mono) and any rate (resampled linearly; speech below 8 kHz carries
little, so nothing finer is needed for this model). The digit set's voices are split by voice, never
by clip: every clip of a "test" voice is one the model never heard, and "val" voices tune the recipe.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import random
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

SAMPLE_RATE = 16000
MAX_AUDIO_BYTES = 8 * 1024 * 1024   # a WAV part over this is refused before it is parsed
MAX_AUDIO_SECONDS = 30.0            # ... and one longer than this (the model takes far less after trimming)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
FLITE_VOICES = ("kal", "awb", "rms", "slt")


class AudioDataError(PocketLMError):
    pass


def read_wav(data: bytes, what: str = "audio", rate: int = SAMPLE_RATE) -> np.ndarray:
    """WAV bytes -> float32 mono waveform at `rate`. Anything else is an AudioDataError naming `what`."""
    if len(data) > MAX_AUDIO_BYTES:
        raise AudioDataError(f"{what}: {len(data)} bytes is over the limit of {MAX_AUDIO_BYTES}")
    try:
        with wave.open(io.BytesIO(data)) as f:
            channels, width, source_rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            if n / max(1, source_rate) > MAX_AUDIO_SECONDS:
                raise AudioDataError(f"{what}: {n / source_rate:.1f} s is over the limit of {MAX_AUDIO_SECONDS:.0f} s")
            frames = f.readframes(n)
    except (wave.Error, EOFError) as e:
        raise AudioDataError(f"{what}: not a PCM WAV file ({e})") from None
    if width not in (1, 2, 3, 4) or channels < 1 or source_rate < 1000:
        raise AudioDataError(f"{what}: unsupported WAV ({width * 8}-bit, {channels} channel(s), {source_rate} Hz)")
    if width == 3:  # 24-bit: widen each sample to 32 bits
        b = np.frombuffer(frames[:len(frames) // 3 * 3], dtype=np.uint8).reshape(-1, 3)
        x = (np.pad(b, ((0, 0), (1, 0))).view("<i4").ravel()).astype(np.float32) / 2 ** 31
    elif width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128) / 128
    else:
        x = np.frombuffer(frames, dtype={2: "<i2", 4: "<i4"}[width]).astype(np.float32) / 2 ** (8 * width - 1)
    x = x[:len(x) // channels * channels].reshape(-1, channels).mean(1)
    if source_rate != rate and len(x):
        t = np.arange(int(len(x) * rate / source_rate)) * (source_rate / rate)
        x = np.interp(t, np.arange(len(x)), x).astype(np.float32)
    return x


def decode_audio_part(data: str, fmt: str, what: str = "input_audio") -> np.ndarray:
    """An OpenAI input_audio part (base64 data and its format) -> waveform. WAV only."""
    if fmt != "wav":
        raise AudioDataError(f"{what}.format: only 'wav' audio is read, got {fmt!r}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise AudioDataError(f"{what}.data: the base64 data is corrupt") from None
    return read_wav(raw, f"{what}.data")


def read_wav_file(path) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AudioDataError(f"{path}: cannot read the audio file ({e.strerror})") from None
    return read_wav(data, str(path))


# ---- spoken digits, synthesized ------------------------------------------------------------------
def voices(seed: int = 0) -> list[dict]:
    """Every voice with its split: espeak-ng accents x variants, and flite's voices. Whole variants
    (a timbre, in every accent) and one flite voice are held out for test, others for val."""
    espeak = shutil.which("espeak-ng")
    if espeak is None or shutil.which("flite") is None:
        raise AudioDataError("spoken digits need espeak-ng and flite (Debian: apt install espeak-ng flite)")
    listing = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = sorted(line.split()[4].removeprefix("!v/") for line in listing.splitlines()[1:] if line.split())
    random.Random(seed).shuffle(variants)
    n_test, n_val = len(variants) // 5, len(variants) // 10
    split_of = {v: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, v in enumerate(variants)}
    out = [{"engine": "espeak-ng", "voice": f"{accent}+{v}", "split": split_of[v]}
           for v in variants for accent in ESPEAK_ACCENTS]
    out += [{"engine": "flite", "voice": v, "split": {"rms": "test", "slt": "val"}.get(v, "train")} for v in FLITE_VOICES]
    return out


def synthesize(engine: str, voice: str, text: str, out: Path, speed: int, pitch: int) -> None:
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text]
    else:  # flite's rate: duration stretch, 1 = as the voice speaks
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={175 / speed:.2f}", "-t", text, "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)


def build_spoken_digits(out, seed: int = 0, accents: int = len(ESPEAK_ACCENTS), takes: int = 1, log=print) -> Path:
    """Every digit word in every voice, `takes` times at a random speed and pitch each (flite voices,
    few, get 8 takes), into out/ with manifest.csv (file, label, word, engine, voice, split, speed, pitch).
    Returns the manifest's path; an existing manifest is kept (delete the folder to rebuild)."""
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chosen = [v for v in voices(seed) if v["engine"] == "flite" or v["voice"].split("+")[0] in ESPEAK_ACCENTS[:accents]]
    rows = []
    for v in chosen:
        for label, word in enumerate(DIGIT_WORDS):
            for take in range(takes * (8 if v["engine"] == "flite" else 1)):
                speed, pitch = rng.randint(120, 230), rng.randint(25, 75)
                file = f"{v['voice'].replace('+', '_')}_{word}_{take}.wav"
                synthesize(v["engine"], v["voice"], word, out / file, speed, pitch)
                rows.append({"file": file, "label": label, "word": word, **v, "speed": speed, "pitch": pitch})
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(manifest)  # the manifest last, so a half-built folder has none and is rebuilt
    log(f"{len(rows)} clips from {len(chosen)} voices in {out}")
    return manifest


def load_spoken_digits(folder) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """{"train", "val", "test"} -> (waveforms, labels) from a folder build_spoken_digits wrote."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.exists():
        raise AudioDataError(f"{manifest}: no manifest (build the set with python -m pocketlm.data.speech --out {folder})")
    splits: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test")}
    with open(manifest, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if row.get("split") not in splits:
                raise AudioDataError(f"{manifest}, line {line}: split must be train, val or test, got {row.get('split')!r}")
            waves, labels = splits[row["split"]]
            waves.append(read_wav_file(Path(folder) / row["file"]))
            labels.append(int(row["label"]))
    return {k: (w, np.array(y, dtype=np.int64)) for k, (w, y) in splits.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="synthesize the spoken-digit set with espeak-ng and flite")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--takes", type=int, default=1, help="renders per espeak-ng voice and digit")
    args = ap.parse_args(argv)
    try:
        print(build_spoken_digits(args.out, args.seed, takes=args.takes))
    except AudioDataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
