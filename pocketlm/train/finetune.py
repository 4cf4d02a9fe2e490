"""`pocketlm finetune`: supervised fine-tuning (full, or LoRA) on the same loop as pre-training.

Resume, checkpoints, metrics.jsonl/loss.png, early stopping with the best checkpoint kept, and
torchrun all come from pocketlm.train.loop. What is particular to fine-tuning:
  - the data: conversations rendered with the model's chat template, loss on the assistant's tokens;
  - LoRA: the base is frozen, the optimizer sees only the adapters, every checkpoint holds only the
    adapter in PEFT's format (not the base weights), and RUN/adapter/ is the final one (the best one
    with early stopping);
  - packing (finetune.pack): short examples share rows of up to seq_len tokens, attention kept apart;
  - RUN/task.json records how rows became prompts, so `pocketlm eval` renders them the same way.

A config file may have `model:` (only `dropout` applies: the architecture comes from --model),
`train:` (TrainConfig) and `finetune:` (FinetuneConfig) sections, parsed and validated by
pocketlm.config like pre-training's; flags and --key=value win over it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pocketlm.config import ConfigError, FinetuneConfig, load_finetune_config
from pocketlm.data.sft import TaskSpec, detect_file_format, encode_examples, load_examples, parse_labels
from pocketlm.data.sft_batches import SFTBatches, SFTEvalBatches
from pocketlm.model import load_model
from pocketlm.model.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, apply_adapter, load_adapter_weights,
                                 lora_modules, save_adapter)
from pocketlm.train.dist import setup_distributed, teardown
from pocketlm.train.loop import cpu_lacks_bf16, train

def build_configs(config_path=None, overrides: dict | None = None, flags: dict | None = None):
    """(TrainConfig, FinetuneConfig, dropout or None) from defaults < config file < flags/overrides."""
    run = load_finetune_config(config_path, overrides, flags)
    return run.train, run.finetune, run.dropout


def set_dropout(model, p: float) -> None:
    """Embedding, attention and residual dropout of an existing model."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"model.dropout: expected a value in [0, 1), got {p}")
    model.cfg.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def _split(examples, fraction: float, cap: int, seed: int):
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(cap, max(1, int(len(examples) * fraction)))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def task_spec(ft: FinetuneConfig, data) -> TaskSpec:
    """How the rows of `data` (its format detected from the file) become conversations."""
    return TaskSpec(format=detect_file_format(data), system=ft.system, instruction=ft.instruction,
                    labels=parse_labels(ft.labels), no_answer=ft.no_answer or "unanswerable")


def finetune(model_source, data, out_dir, val_data=None, config_path=None, overrides: dict | None = None,
             flags: dict | None = None, resume: bool = False, adapter=None, *, user: str | None = None,
             data_dir=None, adapter_name: str = "personal") -> dict:
    """Fine-tune `model_source` on `data` into `out_dir`. With `user` (and `data_dir`): a LoRA for that
    user, from its history when `data` is None, kept and registered in the data dir (train/personal.py)."""
    if user is not None:
        if data_dir is None or out_dir is not None:
            raise ConfigError("finetune --user: give --data-dir (the serve data dir) and no --out "
                              "(the adapter goes into the data dir, under the user)")
        from pocketlm.train.personal import finetune_user

        return finetune_user(model_source, user, data_dir, data, adapter_name, flags=flags, val_data=val_data,
                             config_path=config_path, overrides=overrides, resume=resume, adapter=adapter)
    if data is None or out_dir is None:
        raise ConfigError("finetune: give --data (a training file) and --out (the run directory), "
                          "or --user U --data-dir DIR")
    train_cfg, ft, dropout = build_configs(config_path, overrides, flags)
    out_dir = Path(out_dir)
    dist = setup_distributed()
    train_cfg = train_cfg.for_world(dist.world_size)  # micro-batch x accumulation from train.global_batch
    if ft.lora and train_cfg.dist == "fsdp":
        raise ConfigError("train.dist: fsdp does not shard a LoRA run (its frozen base and adapters differ in "
                          "dtype, and the adapter is small); use auto or ddp")
    model, tokenizer = load_model(model_source)
    if tokenizer is None:
        raise ConfigError(f"{model_source}: has no tokenizer (fine-tuning renders the chat template)")
    if dropout is not None:
        set_dropout(model, dropout)

    # data: the format is detected from the training file; the validation file must match it
    skipped: list[str] | None = [] if ft.skip_invalid else None
    train_ex, spec = load_examples(data, task_spec(ft, data), limit=ft.limit or None, skipped=skipped)
    if val_data:
        val_ex, _ = load_examples(val_data, spec, skipped=skipped)
    else:
        train_ex, val_ex = _split(train_ex, ft.val_fraction, ft.max_val_examples, train_cfg.seed)
    if skipped and dist.is_main:
        print(f"skipped {len(skipped)} invalid rows (skip_invalid), first: {skipped[0]}", file=sys.stderr)
    max_len = min(train_cfg.seq_len, model.cfg.block_size) + 1
    train_enc, dropped = encode_examples(tokenizer, train_ex, max_len)
    val_enc, val_dropped = encode_examples(tokenizer, val_ex, max_len)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    torch.manual_seed(train_cfg.seed)  # the adapters' initial A matrices: the same on every rank and every run
    if ft.lora:
        if adapter:  # continue training an existing adapter
            apply_adapter(model, adapter, merge=False, dropout=ft.lora_dropout)
        else:
            add_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
    elif adapter:
        apply_adapter(model, adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.is_main:
        n_tok = sum(len(ids) for ids, _ in train_enc)
        n_scored = sum(sum(t != -100 for t in labels) for _, labels in train_enc)
        print(f"data: {spec.format}; {len(train_enc):,} training examples ({n_tok:,} tokens, {n_scored:,} scored), "
              f"{len(val_enc):,} validation" + (f"; dropped {dropped + val_dropped} whose reply fell beyond "
                                               f"seq_len {max_len - 1}" if dropped + val_dropped else ""))
        print(f"model: {model.cfg.arch}, {trainable / 1e6:.3f}M trainable parameters"
              + (f" (LoRA r={model.lora['rank']} on {','.join(model.lora['targets'])})" if ft.lora else " (full fine-tuning)"))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "task.json").write_text(spec.to_json())

    train_data = SFTBatches(train_enc, train_cfg.batch_size, pad_id, seed=train_cfg.seed, group_by_length=ft.group_by_length,
                            rank=dist.rank, world_size=dist.world_size, pack_len=max_len - 1 if ft.pack else 0)
    if dist.is_main:
        print(f"batches: {train_cfg.batch_size * dist.world_size} "
              + (f"rows packed with up to {max_len - 1} tokens ({len(train_enc) / len(train_data.rows):.1f} examples per row)"
                 if ft.pack else "examples") + f"; {train_data.steps_per_epoch():,} micro-steps per epoch")
    val = SFTEvalBatches(val_enc, train_cfg.batch_size, pad_id) if val_enc else None

    # LoRA checkpoints hold only the adapter (PEFT format) beside the optimizer, RNG and data state:
    # --resume reads the frozen base from --model again and the adapter into the modules added above.
    def save_lora(path, m):
        save_adapter(m, path, base_model=str(model_source), extra_files={"task.json": spec.to_json()})

    def load_lora(path, m):
        if not (path / ADAPTER_WEIGHTS).exists():
            raise ConfigError(f"{path}: holds full model weights, no LoRA adapter; this run was not a LoRA run "
                              "(resume it without --lora)")
        load_adapter_weights(m, path)

    run_config = {"model": model.cfg.to_dict(), "base_model": str(model_source), "data": str(data), "val_data": str(val_data) if val_data else None,
                  "train": dataclasses.asdict(train_cfg), "finetune": dataclasses.asdict(ft),
                  "dropout": model.cfg.dropout, "task": dataclasses.asdict(spec)}
    if ft.lora and train_cfg.dtype == "bf16" and not cpu_lacks_bf16(dist.device):  # else the loop trains in fp32
        frozen_to_bf16(model)
    try:
        # On CPU, the math attention kernel's backward is several times faster than the flash one
        # at fine-tuning lengths (measured: 2.8 s of an 11 s SmolLM2 step went to flash backward).
        kernels = [SDPBackend.MATH] if dist.device.type == "cpu" else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(kernels):
            result = train(model, tokenizer, train_cfg, train_data, val, out_dir, resume=resume, dist=dist,
                           save_weights=save_lora if ft.lora else None, load_weights=load_lora if ft.lora else None,
                           run_config=run_config, varying_lengths=not ft.pack)
        if dist.is_main:
            if ft.lora:
                dst = publish_adapter(out_dir)
                result["adapter"] = str(dst)
            result.update({"train_examples": len(train_enc), "val_examples": len(val_enc), "trainable_params": trainable})
            (out_dir / "results.json").write_text(json.dumps(result, indent=2))
            if ft.lora:  # RUN/adapter/README.md: a Hugging Face model card, its training figures from results.json
                from pocketlm.eval.card import card

                card(dst, datasets=[Path(data).name], model_name=out_dir.name)
            print(f"done: {result['step']} steps in {result['elapsed_s']:.0f}s ({result['stop_reason']})"
                  + (f"; val loss {result['val_loss']:.4f}" if "val_loss" in result else "")
                  + (f"; adapter -> {result['adapter']}" if ft.lora else f"; model -> {out_dir}"))
    finally:
        teardown()
    return result


def publish_adapter(out_dir: Path, names=(ADAPTER_CONFIG, ADAPTER_WEIGHTS, "task.json")) -> Path:
    """RUN/adapter: the best adapter when early stopping kept one, else the last checkpoint's."""
    best = out_dir / "checkpoints" / "best"
    src = best if (best / ADAPTER_CONFIG).exists() else _newest(out_dir)
    dst = out_dir / "adapter"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for name in names:
        shutil.copy2(src / name, dst / name)
    return dst


def frozen_to_bf16(model) -> None:
    """Under bf16 autocast every matmul reads a bf16 copy of its weight; a frozen projection can just
    be stored that way, which saves the per-step cast (the adapters stay fp32). Tied embeddings are
    left alone: they feed the fp32 residual stream."""
    for mod in lora_modules(model).values():
        mod.weight.data = mod.weight.data.to(torch.bfloat16)
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.to(torch.bfloat16)


def _newest(run_dir: Path) -> Path:
    from pocketlm.model.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)[-1]
