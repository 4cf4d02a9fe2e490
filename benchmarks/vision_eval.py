"""Accuracy through the chat path of a saved vision model (what `make vlm` or the recipe wrote) on
one image set's validation and test splits: greedy replies matched against the label word.

    python benchmarks/vision_eval.py --model runs/vlm --sets mnist,fashion [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pocketlm, not an installed one

from pocketlm.data import images as image_data
from pocketlm.model.vision import load_vision_model, prepare_images
from pocketlm.train.vlm import TASKS, chat_accuracy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sets", default="mnist")
    ap.add_argument("--limit", type=int, default=0, help="the first N images of each split (0: all)")
    ap.add_argument("--val-limit", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vlm, tok = load_vision_model(args.model)
    out = {}
    for name in args.sets.split(","):
        splits = image_data.labelled_splits(name)
        for split, limit in (("val", args.val_limit), ("test", args.limit)):
            x, y = splits[split]
            x, y = (x[:limit], y[:limit]) if limit else (x, y)
            c0 = time.process_time()
            acc, replies = chat_accuracy(vlm, tok, prepare_images(x, vlm.vision_cfg), torch.as_tensor(y), TASKS[name])
            out[f"{name}_{split}"] = {"accuracy": acc, "images": len(y), "cpu_s": round(time.process_time() - c0, 1)}
            print(f"{name} {split}: {acc:.4f} on {len(y)} images ({out[f'{name}_{split}']['cpu_s']} CPU-s); "
                  f"replies {replies[:4]}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
