"""pretrain / finetune (both also under torchrun)."""

from __future__ import annotations

from pocketlm.cli.common import add_task_args


def _pretrain(args, extra):
    from pocketlm.config import load_config, parse_overrides
    from pocketlm.train.pretrain import pretrain

    cfg = load_config(args.config, parse_overrides(extra))
    pretrain(cfg, args.data, args.out, resume=args.resume, max_steps=args.max_steps, max_minutes=args.max_minutes)


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
    data_dir = None
    if args.user is not None:
        from pocketlm.cli.memory import _data_dir

        data_dir = _data_dir(args)
    result = finetune(args.model, args.data, args.out, val_data=args.val_data, config_path=args.config,
                      overrides=overrides, flags=flags, resume=args.resume, adapter=args.adapter, user=args.user,
                      data_dir=data_dir, adapter_name=args.adapter_name)
    if args.user is not None:
        print(f"adapter {args.adapter_name!r} registered for user {args.user} in {data_dir}: serve --data-dir "
              f"{data_dir} runs it for that user's key with \"model\": \"{args.adapter_name}\"")


def register(sub):
    pt = sub.add_parser("pretrain", help="next-token pre-training (also under torchrun)",
                        epilog="Any config key can be overridden: --train.lr=3e-4 --model.n_layer=6 (or --lr=3e-4).")
    pt.add_argument("--config", help="YAML file with model: and train: sections (see configs/)")
    pt.add_argument("--data", required=True, help="directory written by `pocketlm prepare`")
    pt.add_argument("--out", required=True, help="run directory")
    pt.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    pt.add_argument("--max-steps", type=int)
    pt.add_argument("--max-minutes", type=float)
    pt.set_defaults(func=_pretrain, takes_overrides=True)

    ft = sub.add_parser("finetune", help="supervised fine-tuning, full or LoRA (also under torchrun)",
                        epilog="Data formats: chat (messages), prompt/completion (or instruction/output), "
                               "classification (text, label), QA (context, question, answers); .jsonl/.json/.csv/.tsv. "
                               "Any config key can be overridden: --train.lr=1e-4 --model.dropout=0.1 --finetune.val_fraction=0.1")
    ft.add_argument("--model", required=True, help="base model: run, checkpoint, Hugging Face folder or .gguf file")
    ft.add_argument("--data", help="training file (with --user: instead of the user's conversation history)")
    ft.add_argument("--val-data", help="validation file (default: hold out finetune.val_fraction of --data)")
    ft.add_argument("--out", help="run directory (not with --user: that run goes into the data dir)")
    ft.add_argument("--user", help="train a LoRA for this user of --data-dir, from its conversation history "
                    "(or --data), and register it under the user (erased with it)")
    ft.add_argument("--data-dir", help="with --user: the serve data dir (default: $POCKETLM_DATA_DIR, else ./pocketlm-data)")
    ft.add_argument("--adapter-name", default="personal", help="with --user: the name the user's requests give as "
                    "\"model\" to get it (default: personal)")
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
    add_task_args(ft)
    ft.set_defaults(func=_finetune, takes_overrides=True)
