"""Training throughput: pocketlm's GPT-2-style model against transformers' GPT2LMHeadModel.

Same size, batch, sequence length, precision (bf16 autocast), optimizer (torch AdamW) and threads,
in one process, interleaved. pocketlm runs the way `pocketlm pretrain` runs it with
`train.compile: true` (the demo recipe); the eager pocketlm figure is printed too.

    .venv/bin/python benchmarks/train_speed.py [--layers 6 --width 256 --batch 16 --seq 256]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import interleaved, print_machine, train_step
from pocketlm.config import TrainConfig
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.train.optim import build_optimizers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    info = print_machine(a.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    cfg = TrainConfig(lr=1e-3)
    ours_cfg = ModelConfig(arch="gpt2", vocab_size=a.vocab, n_layer=a.layers, n_head=a.heads, n_embd=a.width, block_size=a.seq)
    ours = GPT(ours_cfg).train()
    ours_eager = GPT(ours_cfg).train()
    compiled = torch.compile(ours)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.width, n_layer=a.layers, n_head=a.heads,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    assert abs(sum(p.numel() for p in hf.parameters()) - sum(p.numel() for p in ours.parameters())) == 0, "sizes differ"
    runners = {
        "pocketlm": train_step(ours, build_optimizers(ours, cfg), x, lambda x: compiled(x, x)[1]),
        "pocketlm_eager": train_step(ours_eager, build_optimizers(ours_eager, cfg), x, lambda x: ours_eager(x, x)[1]),
        "transformers": train_step(hf, [torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)], x,
                                lambda x: hf(input_ids=x, labels=x).loss),
    }
    for run in runners.values():  # warm-up (compiles pocketlm)
        run(), run()
    several = {n: (lambda f=f: [f() for _ in range(a.steps)]) for n, f in runners.items()}
    res = interleaved(several, a.reps)
    tokens = a.batch * a.seq * a.steps
    tok_s = {n: tokens / r["median"] for n, r in res.items()}
    for n, r in res.items():
        print(f"{n:15s} {tok_s[n]:9,.0f} tok/s  (median {r['median']:.2f}s, min {r['min']:.2f}s, max {r['max']:.2f}s per {a.steps} steps)")
    ratio = tok_s["pocketlm"] / tok_s["transformers"]
    print(f"pocketlm / transformers: {ratio:.2f}x (eager pocketlm: {tok_s['pocketlm_eager'] / tok_s['transformers']:.2f}x)")
    print(json.dumps({"benchmark": "train_speed", "machine": info, "config": vars(a), "tokens_per_s": tok_s,
                      "ratio": ratio, "ratio_eager": tok_s["pocketlm_eager"] / tok_s["transformers"]}))


if __name__ == "__main__":
    main()
