"""Responsible AI verbs: card (a Hugging Face model card with the eval figures), moderate
(OpenAI's /v1/moderations response for some text, from the command line) and debias (a
counterfactual-data-augmentation LoRA, with before/after figures)."""

from __future__ import annotations

import json


def _card(args):
    from pocketlm.eval.card import card

    path = card(args.model, out=args.out, results=args.results or (), license=args.license,
                datasets=args.datasets.split(",") if args.datasets else None, base_model=args.base_model)
    print(f"model card -> {path}")


def _moderate(args):
    from pocketlm.safety import moderate

    print(json.dumps(moderate(args.text, backend=args.backend, guard_model=args.guard_model), indent=2))


def _debias(args):
    from pocketlm.train.debias import debias

    r = debias(args.model, args.out, args.corpus, lists=tuple(x for x in args.lists.split(",") if x),
               max_minutes=args.max_minutes, max_steps=args.max_steps, seq_len=args.seq_len, batch_size=args.batch_size,
               lr=args.lr, lora_rank=args.lora_rank, max_pieces=args.max_pieces, heldout_chars=args.heldout_chars,
               bias_data=args.bias_data,
               probe=args.probe, bias_limit=args.bias_limit, bias_split=args.bias_split, sst2=args.sst2, sst2_limit=args.sst2_limit,
               evaluate=not args.no_eval, dtype=args.dtype, resume=args.resume,
               budget_clock=args.budget_clock, before=args.before, focus=args.focus)
    shown = {k: r[k] for k in ("before", "after", "change", "training", "cpu_minutes") if k in r}
    for side in ("before", "after"):
        shown.get(side, {}).pop("pair_scores", None)  # in RUN/debias.json
    print(json.dumps(shown, indent=2))
    print(f"adapter -> {r['adapter']} (use it with --adapter, or fold it in with `pocketlm merge`)")


def register(sub):
    c = sub.add_parser("card", help="write README.md in Hugging Face's model-card format, with every eval figure found")
    c.add_argument("model", help="run, checkpoint, Hugging Face folder, .gguf file or LoRA adapter folder")
    c.add_argument("--out", help="where to write the card (default: MODEL/README.md)")
    c.add_argument("--results", nargs="*", help="`pocketlm eval --out` JSON files (default: those found beside MODEL "
                   "and in its eval/ folder)")
    c.add_argument("--license", default="unknown", help="license identifier for the metadata (e.g. apache-2.0)")
    c.add_argument("--datasets", help="comma list for the metadata (default: the eval data names)")
    c.add_argument("--base-model", help="base model for the metadata (an adapter's is read from its config)")
    c.set_defaults(func=_card)

    m = sub.add_parser("moderate", help="check text with a moderation backend; prints OpenAI's /v1/moderations JSON")
    m.add_argument("text", nargs="+", help="one or more messages")
    m.add_argument("--backend", choices=("rules", "classifier", "guard"), default="rules")
    m.add_argument("--guard-model", help="guard backend: a local Llama Guard-format model")
    m.set_defaults(func=_moderate)

    d = sub.add_parser("debias", help="train a counterfactual-data-augmentation LoRA (gender, religion and race swaps) "
                       "and report the bias probe, held-out bits per byte and SST-2 accuracy before and after")
    d.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    d.add_argument("--out", required=True, help="run directory (RUN/adapter, RUN/debias.json)")
    d.add_argument("--corpus", help="text files or a folder of them (default: ../shared/data/gutenberg_books)")
    d.add_argument("--lists", default="gender,religion,race", help="which swap lists (pocketlm/safety/cda.py)")
    d.add_argument("--focus", choices=("occupations",), help="train only on passages that name an occupation "
                   "(cda.OCCUPATIONS), where the occupation-pronoun association lives")
    d.add_argument("--max-minutes", type=float, default=30.0, help="training time budget in minutes (default: 30)")
    d.add_argument("--budget-clock", choices=("cpu", "wall"), default="cpu",
                   help="what --max-minutes counts: this process's CPU time (default) or wall time")
    d.add_argument("--max-steps", type=int, default=100_000, help="training steps (default: until --max-minutes)")
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--lora-rank", type=int, default=8)
    d.add_argument("--max-pieces", type=int, default=20_000, help="corpus passages used (each also swapped)")
    d.add_argument("--heldout-chars", type=int, default=100_000, help="held-out text for the bits-per-byte cost "
                   "(the last 10%% of each book, this many characters in all)")
    d.add_argument("--bias-data", help="probe data (default: ../shared/data/winobias)")
    d.add_argument("--probe", choices=("winobias", "pairs"), default="winobias")
    d.add_argument("--bias-split", choices=("test", "dev"), default="test",
                   help="WinoBias files to measure on: tune on dev, report on test")
    d.add_argument("--bias-limit", type=int, help="at most N pairs (pairs) or sentences per WinoBias file")
    d.add_argument("--sst2", help="SST-2 file for the accuracy cost (default: ../shared/data/sst2/dev.tsv)")
    d.add_argument("--sst2-limit", type=int, help="score only the first N sentences")
    d.add_argument("--no-eval", action="store_true", help="train only, no before/after figures")
    d.add_argument("--before", help="an earlier run's RUN/before folder: reuse its figures (same model, data, limits "
                   "and dtype) instead of measuring the base model again")
    d.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    d.set_defaults(func=_debias)
