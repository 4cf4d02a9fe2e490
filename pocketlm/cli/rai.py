"""Responsible AI verbs: card (a Hugging Face model card with the eval figures) and moderate
(OpenAI's /v1/moderations response for some text, from the command line)."""

from __future__ import annotations


def _card(args):
    from pocketlm.eval.card import card

    path = card(args.model, out=args.out, results=args.results or (), license=args.license,
                datasets=args.datasets.split(",") if args.datasets else None, base_model=args.base_model)
    print(f"model card -> {path}")


def _moderate(args):
    import json

    from pocketlm.safety import moderate

    print(json.dumps(moderate(args.text, backend=args.backend, guard_model=args.guard_model), indent=2))


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
