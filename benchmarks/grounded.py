"""Grounded answers on SQuAD v2: SmolLM2-135M-Instruct before and after the grounded LoRA recipe
(`configs/finetune_grounded.yaml`), beside the ungrounded SQuAD fine-tune on the same questions.

Articles 0-9 train; articles 10-11 are never trained on and are split as benchmarks/squad.py splits
them (every third question is the test set). The test rows retrieve the article's top three
paragraphs by BM25, as `--documents` and the server's `documents` do. Reported: abstention on
unanswerable questions (target >= 80%), answerable F1 (target: within 2 points of the ungrounded
fine-tune's has_ans F1, measured here on the same questions with benchmarks/squad.py's adapter),
and, of the replies that answer, the share citing a passage that contains the answer (target 100%).

    .venv/bin/python benchmarks/grounded.py [--ungrounded runs/squad] [--adapter runs/grounded]
    .venv/bin/python benchmarks/grounded.py --out /tmp/g --limit 2 --max-steps 2 --skip-before  # the script works
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_machine  # noqa: E402
from squad import REPO, TRAIN_ARTICLES, VAL_ARTICLES, arguments, split, timed, train_once  # noqa: E402

from pocketlm.safety.grounded_data import eval_grounded, squad_grounded, write_jsonl  # noqa: E402

CONFIG = REPO / "configs" / "finetune_grounded.yaml"
KEEP = ("n", "abstention_unanswerable", "abstention_answerable", "answerable_f1", "answers", "answers_cited",
        "answers_supported", "retrieval_recall")


def build(out: Path, squad) -> dict[str, Path]:
    test = lambda i: i % 3 == 0  # noqa: E731  (squad.py's test questions)
    rows = {"train": squad_grounded(squad, TRAIN_ARTICLES),
            "watch": squad_grounded(squad, VAL_ARTICLES, keep=lambda i: not test(i)),
            "test": squad_grounded(squad, VAL_ARTICLES, passages="retrieved", keep=test)}
    return {name: write_jsonl(r, out / f"{name}.jsonl") for name, r in rows.items()}


def targets(after: dict, f1_gap: float | None) -> dict:
    """The issue's three targets. A model that never answers has no supported answers to show, so
    that target is missed, not met (the first 4-step run abstained on every question and "met" it)."""
    return {"abstention_unanswerable>=80": (after["abstention_unanswerable"] or 0) >= 80,
            "answers_supported==100": after["answers_supported"] == 100.0,
            "f1_gap<=2": f1_gap is not None and f1_gap <= 2}


def main():
    ap = arguments("grounded")
    ap.add_argument("--ungrounded", default=str(REPO / "runs" / "squad"), help="benchmarks/squad.py's run, the peer")
    args = ap.parse_args()
    print_machine(args.threads)
    files = build(Path(args.out) / "data", args.squad)
    out = {"benchmark": "grounded_squad_v2", "model": Path(args.model).name, "train_articles": list(TRAIN_ARTICLES),
           "val_articles": list(VAL_ARTICLES)}

    if not args.skip_before:
        r, cost = timed(lambda: eval_grounded(args.model, files["test"], limit=args.limit), args.threads)
        out["before"] = {**{k: r[k] for k in KEEP}, "eval": cost}
        print("before:", json.dumps(out["before"]))

    adapter = args.adapter or train_once(args, files, CONFIG, out)
    r, cost = timed(lambda: eval_grounded(args.model, files["test"], adapter=adapter, limit=args.limit), args.threads)
    out["after"] = {**{k: r[k] for k in KEEP}, "eval": cost, "examples": r["examples"][:5]}
    print("after:", json.dumps(out["after"]))

    if (Path(args.ungrounded) / "adapter").exists():  # the peer: the ungrounded fine-tune, same questions
        from pocketlm.eval import evaluate
        sq = split(Path(args.out) / "squad", args.squad)["test"]
        peer = evaluate(args.model, "qa", sq, adapter=args.ungrounded, limit=args.limit)
        out["ungrounded_has_ans_f1"] = round(peer["has_ans"]["f1"], 1)
        out["f1_gap_points"] = round(out["ungrounded_has_ans_f1"] - out["after"]["answerable_f1"], 1)
    else:
        print(f"no ungrounded run at {args.ungrounded} (benchmarks/squad.py writes one): no F1 comparison")
    out["targets"] = targets(out["after"], out.get("f1_gap_points"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
