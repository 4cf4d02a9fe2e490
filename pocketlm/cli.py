"""`pocketlm VERB`: each verb parses its arguments and calls the library function of the same name."""

from __future__ import annotations

import argparse
import sys

from pocketlm.errors import PocketLMError


def _tokenizer_train(args):
    from pocketlm.data.corpus import read_documents, split_train_val
    from pocketlm.tokenizer import Tokenizer

    docs = read_documents(args.input, split_blank_lines=args.split_blank_lines, text_field=args.text_field)
    docs = split_train_val(docs, args.val_fraction)[0]  # never learn merges from validation text
    tok = Tokenizer.train((d.text for d in docs), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained byte-level BPE: {tok.vocab_size} tokens -> {args.out}/tokenizer.json")


def _prepare(args):
    from pocketlm.data.prepare import prepare

    prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
            split_blank_lines=args.split_blank_lines, text_field=args.text_field, workers=args.workers)


def _pretrain(args, extra):
    from pocketlm.config import load_config, parse_overrides
    from pocketlm.train.pretrain import pretrain

    cfg = load_config(args.config, parse_overrides(extra))
    pretrain(cfg, args.data, args.out, resume=args.resume, max_steps=args.max_steps, max_minutes=args.max_minutes)


def _generate(args):
    from pocketlm.infer.generate import generate_cli

    generate_cli(args)


def _add_engine_args(sp, dtype: str):
    """How generate / chat / serve load and run the model."""
    sp.add_argument("--adapter", help="LoRA adapter folder (PEFT format, or a LoRA fine-tuning run) applied on top "
                                      "of --model; merged into the weights at load, so it costs nothing per token")
    sp.add_argument("--dtype", choices=("int8", "int4", "bf16", "fp32"), default=dtype,
                    help=f"weight precision (default {dtype}): int8 (one scale per row, bf16 activations) decodes one "
                         "stream fast on CPU; int4 (groups of 32, as GGUF Q4_1) faster still, and exact for Q4_1 "
                         "files but lossy for others; bf16 decodes many streams at once fastest; fp32 is exact. "
                         "Logits are fp32 in all. See benchmarks/decode_speed.py")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step (minutes to start, faster decode)")
    sp.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")


def _add_sampling_args(sp, max_new_tokens=200):
    _add_engine_args(sp, dtype="int8")  # one stream
    sp.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    sp.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    sp.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set reaching this probability (1: off)")
    sp.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens (1: off)")
    sp.add_argument("--seed", type=int, default=None)


def _chat(args):
    from pocketlm.infer.generate import chat_cli

    chat_cli(args)


def _serve(args):
    from pocketlm.serve.app import serve

    serve(args)


def _add_serving_verbs(sub):
    """chat / serve: the engine behind a terminal and behind HTTP."""
    ch = sub.add_parser("chat", help="talk to a model in the terminal (streaming; /reset, /system, /quit)")
    ch.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ch.add_argument("--system", help="system prompt")
    _add_sampling_args(ch, max_new_tokens=512)
    ch.set_defaults(func=_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page at /")
    sv.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    _add_engine_args(sv, dtype="bf16")  # batches of requests: bf16 has the higher throughput there (measured)
    sv.add_argument("--model-name", help="the id clients pass as `model` (default: the file or folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $POCKETLM_API_KEY, else none)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    sv.add_argument("--max-seq-len", type=int, default=2048, help="positions per slot (prompt + reply)")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    sv.set_defaults(func=_serve)


def _merge(args):
    from pocketlm.model import save_checkpoint
    from pocketlm.model.lora import load_model_with_adapter

    model, tok = load_model_with_adapter(args.model, args.adapter)
    save_checkpoint(args.out, model, tok)
    print(f"merged {args.adapter} into {args.model} -> {args.out}")


def _eval(args):
    import json
    from pathlib import Path

    from pocketlm.data.sft import parse_labels
    from pocketlm.eval import evaluate

    methods = ("likelihood", "generation") if args.method == "both" else (args.method,)
    spec = {"labels": parse_labels(args.labels), "instruction": args.instruction, "system": args.system,
            "no_answer": args.no_answer}
    result = evaluate(args.model, args.task, args.data, adapter=args.adapter, limit=args.limit, spec_overrides=spec,
                      batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, methods=methods)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


def _finetune(args, extra):
    from pocketlm.config import parse_overrides
    from pocketlm.train.finetune import finetune

    flags = {"lora": True if args.lora else None, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
             "lora_dropout": args.lora_dropout, "lora_targets": args.lora_targets, "labels": args.labels,
             "instruction": args.instruction, "system": args.system, "no_answer": args.no_answer,
             "pack": True if args.pack else None, "skip_invalid": True if args.skip_invalid else None}
    overrides = parse_overrides(extra)
    for key in ("max_steps", "max_minutes"):
        if getattr(args, key) is not None:
            overrides[f"train.{key}"] = getattr(args, key)
    finetune(args.model, args.data, args.out, val_data=args.val_data, config_path=args.config, overrides=overrides,
             flags=flags, resume=args.resume, adapter=args.adapter)


def _add_task_args(sp):
    """How rows become prompts (saved in task.json by finetune; eval reads it back)."""
    sp.add_argument("--labels", help="classification: RAW=WORD pairs, e.g. 0=negative,1=positive (default: labels as written)")
    sp.add_argument("--instruction", help="classification/QA: instruction put before the text")
    sp.add_argument("--system", help="system message of every conversation")
    sp.add_argument("--no-answer", help="QA: the reply meaning the context has no answer (default: unanswerable)")


def _add_adapter_verbs(sub):
    """finetune / eval / merge (LoRA adapters are PEFT-format folders)."""
    me = sub.add_parser("merge", help="fold a LoRA adapter into the model's weights")
    me.add_argument("--model", required=True, help="the base model the adapter was trained on")
    me.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    me.add_argument("--out", required=True, help="checkpoint directory for the merged model")
    me.set_defaults(func=_merge)

    ft = sub.add_parser("finetune", help="supervised fine-tuning, full or LoRA (also under torchrun)",
                        epilog="Data formats: chat (messages), prompt/completion (or instruction/output), "
                               "classification (text, label), QA (context, question, answers); .jsonl/.json/.csv/.tsv. "
                               "Any config key can be overridden: --train.lr=1e-4 --model.dropout=0.1 --finetune.val_fraction=0.1")
    ft.add_argument("--model", required=True, help="base model: run, checkpoint, Hugging Face folder or .gguf file")
    ft.add_argument("--data", required=True, help="training file")
    ft.add_argument("--val-data", help="validation file (default: hold out finetune.val_fraction of --data)")
    ft.add_argument("--out", required=True, help="run directory")
    ft.add_argument("--config", help="YAML with train:, finetune: (and model: dropout) sections, e.g. configs/finetune_*.yaml")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    ft.add_argument("--lora-rank", type=int)
    ft.add_argument("--lora-alpha", type=float)
    ft.add_argument("--lora-dropout", type=float)
    ft.add_argument("--lora-targets", help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (or all/attn/mlp)")
    ft.add_argument("--adapter", help="start from this adapter (continued LoRA training, or merged before full fine-tuning)")
    ft.add_argument("--pack", action="store_true", help="pack short examples into rows of up to seq_len tokens "
                    "(no attention across examples; batch_size then counts rows)")
    ft.add_argument("--skip-invalid", action="store_true", help="leave out rows that fail validation (e.g. an empty "
                    "reply) and report how many, instead of stopping at the first")
    ft.add_argument("--max-steps", type=int)
    ft.add_argument("--max-minutes", type=float)
    _add_task_args(ft)
    ft.set_defaults(func=_finetune, takes_overrides=True)

    ev = sub.add_parser("eval", help="evaluate a model: lm (bits per byte), classification, qa; prints JSON")
    ev.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ev.add_argument("--adapter", help="LoRA adapter folder to apply (PEFT format)")
    ev.add_argument("--task", required=True, choices=("lm", "classification", "qa"))
    ev.add_argument("--data", required=True, help="lm: .txt/.jsonl text; classification/qa: .jsonl/.json/.csv/.tsv")
    ev.add_argument("--limit", type=int, help="at most N examples (lm: N windows)")
    ev.add_argument("--out", help="also write the JSON here")
    ev.add_argument("--method", choices=("likelihood", "generation", "both"), default="both",
                    help="classification: score each label's likelihood, generate, or both (default)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seq-len", type=int, default=1024, help="lm: tokens per window")
    ev.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    _add_task_args(ev)
    ev.set_defaults(func=_eval)


def _import(args):
    from pocketlm.model import load_model, save_checkpoint

    model, tokenizer = load_model(args.source)
    save_checkpoint(args.out, model, tokenizer, extra_config={"source": str(args.source)})
    cfg = model.cfg
    print(f"imported {args.source}: {cfg.arch}, {cfg.n_layer} layers, d={cfg.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {args.out}")


def _export(args):
    from pocketlm.model import load_model
    from pocketlm.model.hf import export_hf

    model, tokenizer = load_model(args.model)
    export_hf(model, tokenizer, args.out)
    print(f"exported {args.model} ({args.format}) -> {args.out}")


def _download(args):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PocketLMError("downloading needs the huggingface_hub package: pip install huggingface_hub") from None
    # not *.gguf by default: GGUF repos hold one file per quantization, pick one with --include
    patterns = args.include or ["*.json", "*.safetensors", "*.jinja", "*.txt"]
    path = snapshot_download(args.repo_id, local_dir=args.out, revision=args.revision, allow_patterns=patterns)
    print(f"downloaded {args.repo_id} -> {path}\nuse it with: pocketlm generate --model {path} --chat --prompt ...")


def _add_checkpoint_verbs(sub):
    """import / export / download: real checkpoints in and out."""
    im = sub.add_parser("import", help="convert a Hugging Face folder or .gguf file into a pocketlm checkpoint")
    im.add_argument("source", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or .gguf file")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.set_defaults(func=_import)

    ex = sub.add_parser("export", help="write a model as a folder transformers loads (AutoModelForCausalLM)")
    ex.add_argument("model", help="run, checkpoint, Hugging Face folder or .gguf file")
    ex.add_argument("--format", choices=("hf",), default="hf")
    ex.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    ex.set_defaults(func=_export)

    dl = sub.add_parser("download", help="fetch a model repo from the Hugging Face Hub (needs huggingface_hub)")
    dl.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    dl.add_argument("--out", required=True, help="local folder")
    dl.add_argument("--revision", help="branch, tag or commit")
    dl.add_argument("--include", nargs="+", help="file patterns to fetch (default: *.json *.safetensors *.jinja *.txt; "
                    "for a GGUF repo name the file, e.g. '*Q4_1.gguf')")
    dl.set_defaults(func=_download)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketlm", description="Train, fine-tune, evaluate and serve small language models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add_corpus_args(sp):
        sp.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files, directories or globs")
        sp.add_argument("--split-blank-lines", action="store_true", help="in .txt files, each blank-line-separated block is a document")
        sp.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default: text)")

    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tk_sub = tk.add_subparsers(dest="action", required=True)
    tt = tk_sub.add_parser("train", help="train on text files")
    add_corpus_args(tt)
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold out the corpus's last share, as `prepare --val-fraction` does (default: 0)")
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.set_defaults(func=_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    add_corpus_args(pr)
    pr.add_argument("--tokenizer", required=True, help="tokenizer directory (or a model/run that has one)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus (its end) held out for validation")
    pr.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")
    pr.set_defaults(func=_prepare)

    pt = sub.add_parser("pretrain", help="next-token pre-training (also under torchrun)",
                        epilog="Any config key can be overridden: --train.lr=3e-4 --model.n_layer=6 (or --lr=3e-4).")
    pt.add_argument("--config", help="YAML file with model: and train: sections (see configs/)")
    pt.add_argument("--data", required=True, help="directory written by `pocketlm prepare`")
    pt.add_argument("--out", required=True, help="run directory")
    pt.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    pt.add_argument("--max-steps", type=int)
    pt.add_argument("--max-minutes", type=float)
    pt.set_defaults(func=_pretrain, takes_overrides=True)

    ge = sub.add_parser("generate", help="sample text from a model (streams to stdout)")
    ge.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ge.add_argument("--prompt", default="", help="text to continue (or the user message with --chat)")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ge.add_argument("--system", help="system message (with --chat)")
    _add_sampling_args(ge)
    ge.set_defaults(func=_generate)
    _add_serving_verbs(sub)
    _add_adapter_verbs(sub)
    _add_checkpoint_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except KeyboardInterrupt:
        return 130
    except (PocketLMError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # what the user gave was wrong, and the message names it; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        print(f"pocketlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
