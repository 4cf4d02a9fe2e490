"""import / export / download / merge: real checkpoints in and out."""

from __future__ import annotations

from pocketlm.errors import PocketLMError


def _import(args):
    from pocketlm.model import load_model, save_checkpoint

    model, tokenizer = load_model(args.source)
    save_checkpoint(args.out, model, tokenizer, extra_config={"source": str(args.source)})
    cfg = model.cfg
    print(f"imported {args.source}: {cfg.arch}, {cfg.n_layer} layers, d={cfg.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {args.out}")


def _export(args):
    from pocketlm.eval.card import card
    from pocketlm.model import load_model
    from pocketlm.model.hf import export_hf

    if args.format == "mmproj":
        from pocketlm.model.mmproj import export_mmproj
        from pocketlm.model.vision import load_vision_model

        model, _ = load_vision_model(args.model)
        out = export_mmproj(model, args.out, name=args.model_name or "pocketlm vision tower")
        n = model.tokens_per_image
        print(f"exported the vision tower of {args.model} (mmproj, clip/lfm2) -> {out}\n"
              f"llama.cpp: llama-mtmd-cli -m LM.gguf --mmproj {out} --image-min-tokens {n} --image-max-tokens {n} "
              f"(images of {model.vision_cfg.image_size}x{model.vision_cfg.image_size} go in unchanged)")
        return

    from pocketlm.model.speech import speech_tower
    from pocketlm.model.vision import vision_tower

    model, tokenizer = load_model(args.model)
    towers = []  # a vision or speech model's tower goes beside the LM, as in the checkpoint it came from
    if (tower := vision_tower(args.model, model)) is not None:
        towers.append((tower, tower.vision_cfg.to_dict()))
    if (tower := speech_tower(args.model, model)) is not None:
        towers.append((tower, tower.speech_cfg.to_dict()))
    export_hf(model, tokenizer, args.out, towers=towers)
    # the card carries the figures `pocketlm eval` wrote beside the source model
    readme = card(args.out, results_from=args.model, model_name=args.model_name)
    print(f"exported {args.model} ({args.format}) -> {args.out} (model card: {readme.name})")


def _download(args):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PocketLMError("downloading needs the huggingface_hub package: pip install huggingface_hub") from None
    # not *.gguf by default: GGUF repos hold one file per quantization, pick one with --include
    patterns = args.include or ["*.json", "*.safetensors", "*.jinja", "*.txt"]
    path = snapshot_download(args.repo_id, local_dir=args.out, revision=args.revision, allow_patterns=patterns)
    print(f"downloaded {args.repo_id} -> {path}\nuse it with: pocketlm generate --model {path} --chat --prompt ...")


def _merge(args):
    from pocketlm.model import save_checkpoint
    from pocketlm.model.lora import load_model_with_adapter

    model, tok = load_model_with_adapter(args.model, args.adapter)
    save_checkpoint(args.out, model, tok)
    print(f"merged {args.adapter} into {args.model} -> {args.out}")


def register(sub):
    im = sub.add_parser("import", help="convert a Hugging Face folder or .gguf file into a pocketlm checkpoint")
    im.add_argument("source", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or .gguf file")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.set_defaults(func=_import)

    ex = sub.add_parser("export", help="write a model as a folder transformers loads (AutoModelForCausalLM), or a "
                        "vision model's tower as a llama.cpp mmproj file")
    ex.add_argument("model", help="run, checkpoint, Hugging Face folder or .gguf file")
    ex.add_argument("--format", choices=("hf", "mmproj"), default="hf",
                    help="hf: the LM as a Hugging Face folder; mmproj: the vision encoder and projector as the "
                    "GGUF file llama.cpp's multimodal tools load with --mmproj (a patch-stem vision model)")
    ex.add_argument("--out", required=True, help="hf: folder to write (replaced atomically if it exists), with a "
                    "README.md model card carrying the eval results found beside MODEL; mmproj: the .gguf file")
    ex.add_argument("--model-name", help="the name in the model card (default: the --out folder's name)")
    ex.set_defaults(func=_export)

    dl = sub.add_parser("download", help="fetch a model repo from the Hugging Face Hub (needs huggingface_hub)")
    dl.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    dl.add_argument("--out", required=True, help="local folder")
    dl.add_argument("--revision", help="branch, tag or commit")
    dl.add_argument("--include", nargs="+", help="file patterns to fetch (default: *.json *.safetensors *.jinja *.txt; "
                    "for a GGUF repo name the file, e.g. '*Q4_1.gguf')")
    dl.set_defaults(func=_download)

    me = sub.add_parser("merge", help="fold a LoRA adapter into the model's weights")
    me.add_argument("--model", required=True, help="the base model the adapter was trained on")
    me.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    me.add_argument("--out", required=True, help="checkpoint directory for the merged model")
    me.set_defaults(func=_merge)
