"""Spoken digits on held-out voices: the speech model through the chat path against pocketsphinx
(PyPI's wheel, with its bundled US-English acoustic model) on the same clips, same run.

    make speech                                             # the clips and runs/speech first
    python benchmarks/speech_digits.py --model runs/speech --data runs/spoken_digits [--split test] [--limit N]

pocketsphinx runs twice: with a JSGF grammar of the ten digit words (a closed vocabulary, as the
speech model has) and with its general English language model (a reply is right when its words
hold the digit's word and no other digit word). pocketlm's reply is right as the recipe scores it
(the digit or its word). Also printed: CPU milliseconds a clip for each, one thread. Last line JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine_info  # noqa: E402
from pocketlm.data.speech import DIGIT_WORDS, read_wav_file  # noqa: E402
from pocketlm.model.speech import load_speech_model, prepare_clips  # noqa: E402
from pocketlm.train.speech_recipe import TASK  # noqa: E402
from pocketlm.train.vlm import chat_replies  # noqa: E402

GRAMMAR = f"#JSGF V1.0; grammar digits; public <d> = {' | '.join(DIGIT_WORDS)};"


def sphinx_replies(waves, grammar: bool) -> tuple[list[str], float]:
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, loglevel="FATAL")
    if grammar:
        decoder.add_jsgf_string("digits", GRAMMAR)
        decoder.activate_search("digits")
    out, c0 = [], time.process_time()
    for w in waves:
        decoder.start_utt()
        decoder.process_raw((np.clip(w, -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        decoder.end_utt()
        out.append(decoder.hyp().hypstr if decoder.hyp() else "")
    return out, (time.process_time() - c0) / max(1, len(waves)) * 1000


def sphinx_right(reply: str, label: int) -> bool:
    said = [w for w in reply.lower().split() if w in DIGIT_WORDS]
    return bool(said) and set(said) == {DIGIT_WORDS[label]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/speech")
    ap.add_argument("--data", default="runs/spoken_digits")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--limit", type=int, default=0, help="the first N clips of the split (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info(1)
    print(f"machine: {info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores, 1 thread", flush=True)
    with open(Path(args.data) / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == args.split]
    rows = rows[:args.limit] if args.limit else rows
    waves = [read_wav_file(Path(args.data) / r["file"]) for r in rows]
    labels = [int(r["label"]) for r in rows]
    print(f"{len(rows)} clips of {len({r['voice'] for r in rows})} {args.split} voices", flush=True)

    slm, tok = load_speech_model(args.model)
    c0 = time.process_time()
    with torch.no_grad():
        replies = chat_replies(slm, tok, prepare_clips(waves, slm.speech_cfg), TASK.question)
    ours_ms = (time.process_time() - c0) / len(rows) * 1000
    ours = float(np.mean([TASK.right(r, y) for r, y in zip(replies, labels)]))
    figures = {"pocketlm": {"accuracy": ours, "cpu_ms_per_clip": ours_ms}}
    for name, grammar in (("pocketsphinx_grammar", True), ("pocketsphinx_lm", False)):
        got, ms = sphinx_replies(waves, grammar)
        figures[name] = {"accuracy": float(np.mean([sphinx_right(r, y) for r, y in zip(got, labels)])),
                         "cpu_ms_per_clip": ms}
    for name, f in figures.items():
        print(f"{name:22s} accuracy {f['accuracy']:.4f}  {f['cpu_ms_per_clip']:7.1f} CPU-ms a clip")
    best = max(figures["pocketsphinx_grammar"]["accuracy"], figures["pocketsphinx_lm"]["accuracy"])
    print(f"pocketlm - best pocketsphinx: {100 * (ours - best):+.2f} points")
    print(json.dumps({"machine": info, "clips": len(rows), "split": args.split, **figures}))


if __name__ == "__main__":
    main()
