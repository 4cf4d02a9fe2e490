"""analyze: label or extract fields over a table (CSV, TSV, JSONL, Parquet) with output that always parses."""

from __future__ import annotations


def _analyze(args):
    import json

    from pocketlm.analyze import analyze

    result = analyze(args.file, model=args.model, text=args.text, prompt=args.prompt, labels=args.labels,
                     labels_from=args.labels_from, schema=args.schema, adapter=args.adapter, out=args.out,
                     gold=args.gold, limit=args.limit, dry_run=args.dry_run, resume=args.resume,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                     seed=args.seed, max_tokens=args.max_new_tokens, system=args.system,
                     instruction=args.instruction, batch_size=args.batch_size, dtype=args.dtype,
                     journal=args.journal, report=args.report, group_by=args.group_by,
                     date_column=args.date_column, threads=args.threads, progress=not args.quiet,
                     summary=args.summary)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def register(sub):
    an = sub.add_parser("analyze", help="label or extract fields over every row of a table; output always parses")
    an.add_argument("file", help=".csv, .tsv, .jsonl or .parquet")
    an.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    an.add_argument("--adapter", help="LoRA adapter folder (e.g. from `pocketlm finetune` on the same table)")
    what = an.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the column holding each row's text")
    what.add_argument("--prompt", help="a template with {column} placeholders, e.g. 'Subject: {subject}\\n{body}'")
    out = an.add_mutually_exclusive_group()  # none: the labels a fine-tuned --adapter was trained on
    out.add_argument("--labels", help="a,b,c or @file (one label a line): each row gets one of them")
    out.add_argument("--labels-from", help="take the labels from the distinct values of this column")
    out.add_argument("--schema", help="schema.json, JSON text, or fields such as 'intent, order_id str?, urgency int'")
    an.add_argument("--instruction", help="put before each row's text (default: one naming the labels or the schema)")
    an.add_argument("--system", help="system message of every request")
    an.add_argument("--out", help="labelled.csv|.tsv|.jsonl (default: FILE.labelled beside the input)")
    an.add_argument("--journal", help="the resume journal (default: OUT.journal)")
    an.add_argument("--resume", action="store_true", help="continue an interrupted run from its journal")
    an.add_argument("--gold", help="column of true labels: accuracy, macro-F1 and the confusion matrix")
    an.add_argument("--limit", type=int, help="only the first N rows")
    an.add_argument("--dry-run", action="store_true", help="show row 1's prompt, token counts and an estimated time")
    an.add_argument("--report", help="write report.html (and report.json beside it)")
    an.add_argument("--summary", action="store_true",
                    help="report: a paragraph by the model from the report's facts; numbers not in them are flagged")
    an.add_argument("--group-by", help="report: cross-tab the labels against this column")
    an.add_argument("--date-column", help="report: counts per month of this (ISO date) column")
    an.add_argument("--batch-size", type=int, default=16, help="rows submitted to the engine at once (default 16)")
    an.add_argument("--dtype", choices=("int8", "int4", "bf16", "fp32"), default="fp32")
    an.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    an.add_argument("--max-new-tokens", type=int, help="reply budget (default 64 for labels, 256 for a schema)")
    an.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    an.add_argument("--top-k", type=int, default=0)
    an.add_argument("--top-p", type=float, default=1.0)
    an.add_argument("--min-p", type=float, default=0.0)
    an.add_argument("--seed", type=int, help="with temperature > 0: row i samples with seed + i (reproducible)")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_analyze)
