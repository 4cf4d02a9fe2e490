"""How closely llama.cpp (libmtmd, through llama-cpp-python) computes pocketlm's image embeddings from
the exported mmproj file: a patch-stem encoder of configs/vlm.yaml's size trained for a few stage-0
steps on MNIST (its projector random), exported, loaded beside SmolLM2's GGUF (n_embd 576).

    python benchmarks/mmproj_agreement.py [--steps 200] [--images 64]

Prints the max |difference| of the image embeddings (and the largest |value|, for scale) for test
digits given to llama.cpp three ways: already at image_size (32 px, our resize done first: llama.cpp's
is the identity), at MNIST's own 28 px (llama.cpp resizes them itself), and with llama.cpp's default
token limits (what llama-mtmd-cli does without --image-min-tokens/--image-max-tokens).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import llama_peer
from multi_lora import default_gguf
from pocketlm.data import images as image_data
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.mmproj import export_mmproj
from pocketlm.model.vision import VisionConfig, VisionLM, prepare_images
from pocketlm.train.vlm import train_encoder



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="stage-0 steps of the encoder on MNIST 5k")
    ap.add_argument("--images", type=int, default=64, help="MNIST test digits compared")
    ap.add_argument("--lm", default=None, help="the text model's GGUF (its n_embd sizes the projector)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.lm = args.lm or str(default_gguf())
    if not llama_peer.mtmd_available():
        raise SystemExit("llama-cpp-python with libmtmd is not installed")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # configs/vlm.yaml's encoder with the patch stem (the conv stem does not export)
    cfg = VisionConfig(image_size=32, patch_size=4, stem="patch", channels=1, width=64, depth=2, heads=4,
                       shuffle=2, projector_hidden=256)
    vlm = VisionLM(GPT(ModelConfig(n_layer=1, n_head=4, n_embd=576, vocab_size=64)), cfg)
    train, test = image_data.load_mnist_train_5k(), image_data.load_mnist_test()
    t = time.perf_counter()
    train_encoder(vlm, [(prepare_images(train[0], cfg), torch.from_numpy(train[1]).long())], steps=args.steps,
                  log=lambda *a: None)
    print(f"stage 0: {args.steps} steps in {time.perf_counter() - t:.0f} s")
    vlm.eval()
    digits = test[0][:args.images]                                       # (N, 28, 28) uint8
    with torch.no_grad():
        pixels = prepare_images(digits, cfg)                              # (N, 1, 32, 32) in [0, 1]
        ours = vlm.image_embeds(pixels).numpy()
    at_size = np.repeat((pixels[:, 0] * 255).round().to(torch.uint8).numpy()[..., None], 3, axis=-1)
    requantized = prepare_images(at_size, cfg)                            # (the uint8 round trip, ours)
    with torch.no_grad():
        ours_at_size = vlm.image_embeds(requantized).numpy()
    native = np.repeat(digits[..., None], 3, axis=-1)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_mmproj(vlm, Path(tmp) / "mmproj.gguf")
        n = cfg.tokens_per_image
        rows = [("32 px (image_size), tokens 16..16", ours_at_size,
                 llama_peer.mtmd_image_embeds(path, args.lm, at_size, n, args.threads)),
                ("28 px (MNIST's size), tokens 16..16", ours,
                 llama_peer.mtmd_image_embeds(path, args.lm, native, n, args.threads)),
                ("32 px, llama.cpp's default tokens", ours_at_size,
                 llama_peer.mtmd_image_embeds(path, args.lm, at_size[:1], None, args.threads))]
    print(f"{'input to llama.cpp':38s} {'tokens':>6s} {'max |diff|':>10s} {'mean |diff|':>11s} {'max |ours|':>10s}")
    for name, ref, got in rows:
        tokens = got[0].shape[0]
        if tokens != n:
            print(f"{name:38s} {tokens:6d} {'-':>10s} {'-':>11s} {np.abs(ref).max():10.3f}  (not comparable)")
            continue
        d = np.abs(np.stack(got) - ref[:len(got)])
        print(f"{name:38s} {tokens:6d} {d.max():10.2e} {d.mean():11.2e} {np.abs(ref).max():10.3f}")


if __name__ == "__main__":
    main()
