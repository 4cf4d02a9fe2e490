"""eval: score a model on a task; prints JSON."""

from __future__ import annotations

from pocketlm.cli.common import add_task_args


def _eval(args):
    import json
    import sys
    from pathlib import Path

    from pocketlm.data.sft import parse_labels
    from pocketlm.eval import evaluate

    methods = ("likelihood", "generation") if args.method == "both" else (args.method,)
    spec = {"labels": parse_labels(args.labels), "instruction": args.instruction, "system": args.system,
            "no_answer": args.no_answer}
    result = evaluate(args.model, args.task, args.data, adapter=args.adapter, limit=args.limit, spec_overrides=spec,
                      batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, methods=methods,
                      probe=args.probe, split=args.split,
                      resolution=not args.pairs_only)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    result.pop("pair_scores", None)  # one line per pair: in --out only
    if "computed_dtype" in result:
        print(f"eval: {result['dtype']} is emulated on this CPU (no AVX512-BF16 or AMX), ~20x slower: computed in "
              f"{result['computed_dtype']}", file=sys.stderr)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def register(sub):
    ev = sub.add_parser("eval", help="evaluate a model: lm (bits per byte), classification, qa, bias; prints JSON")
    ev.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ev.add_argument("--adapter", help="LoRA adapter folder to apply (PEFT format)")
    ev.add_argument("--task", required=True, choices=("lm", "classification", "qa", "bias"))
    ev.add_argument("--data", required=True, help="lm: .txt/.jsonl text; classification/qa: .jsonl/.json/.csv/.tsv")
    ev.add_argument("--probe", choices=("winobias", "pairs"), default="winobias",
                    help="bias: the WinoBias folder, or a CrowS-Pairs-format CSV of minimal pairs")
    ev.add_argument("--split", choices=("test", "dev"), default="test",
                    help="bias, WinoBias: which published files (*.txt.test or *.txt.dev)")
    ev.add_argument("--pairs-only", action="store_true",
                    help="bias, WinoBias: the pro/anti pair preference only, not the resolution prompts (~4x its cost)")
    ev.add_argument("--limit", type=int, help="at most N examples (lm: N windows; bias: N pairs, or N sentences per WinoBias file)")
    ev.add_argument("--out", help="also write the JSON here (for bias, with each pair's two log-likelihoods)")
    ev.add_argument("--method", choices=("likelihood", "generation", "both"), default="both",
                    help="classification: score each label's likelihood, generate, or both (default)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seq-len", type=int, default=1024, help="lm: tokens per window")
    ev.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    add_task_args(ev)
    ev.set_defaults(func=_eval)
