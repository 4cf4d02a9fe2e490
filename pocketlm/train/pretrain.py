"""`pocketlm pretrain`: next-token prediction on token shards written by `pocketlm prepare`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pocketlm.config import ConfigError, RunConfig
from pocketlm.data.loader import EvalBatches, PretrainBatches, read_meta
from pocketlm.model.gpt import GPT
from pocketlm.tokenizer import Tokenizer
from pocketlm.train.dist import is_sharded, setup_distributed, teardown
from pocketlm.train.loop import train


def pretrain(cfg: RunConfig, data_dir, out_dir, resume: bool = False, max_steps: int | None = None,
             max_minutes: float | None = None) -> dict:
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    if tokenizer.fingerprint() != meta["tokenizer"]:
        raise ConfigError(f"{data_dir}/tokenizer does not match the tokenizer the shards were made with")
    train_cfg = dataclasses.replace(cfg.train, **{k: v for k, v in
                                    {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None})
    model_cfg = dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"],
                                    block_size=max(cfg.model.block_size, train_cfg.seq_len))
    dist = setup_distributed()
    train_cfg = train_cfg.for_world(dist.world_size)  # micro-batch x accumulation from train.global_batch
    torch.manual_seed(train_cfg.seed)  # same initial weights on every rank
    model = GPT(model_cfg)
    if dist.is_main:
        print(f"model: {model_cfg.arch}, {model.num_params() / 1e6:.2f}M non-embedding parameters, "
              f"{model.flops_per_token(train_cfg.seq_len) / 1e6:.1f} MFLOP/token; "
              f"data: {meta['train']['tokens']:,} train tokens")
    train_data = PretrainBatches(data_dir, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                                 rank=dist.rank, world_size=dist.world_size)
    val_data = EvalBatches(data_dir, train_cfg.batch_size, train_cfg.seq_len)
    run_config = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg), "data": str(data_dir)}
    try:
        result = train(model, tokenizer, train_cfg, train_data, val_data, out_dir, resume=resume, dist=dist,
                       run_config=run_config)
        if dist.is_main or is_sharded(model):  # FSDP2's forward is a collective: every rank runs it
            # the whole validation split, not the periodic subset
            from pocketlm.train.loop import autocast_ctx
            from pocketlm.train.metrics import evaluate_lm
            full = evaluate_lm(model, val_data, torch.tensor(tokenizer.token_byte_lengths(), device=dist.device),
                               autocast_ctx(train_cfg, dist.device))
        if dist.is_main:
            result.update({f"full_{k}": v for k, v in full.items()})
            (Path(out_dir) / "results.json").write_text(__import__("json").dumps(result, indent=2))
            print(f"done: {result['step']} steps in {result['elapsed_s']:.0f}s ({result['stop_reason']}); "
                  f"val loss {full['val_loss']:.4f}, val bits/byte {full['val_bpb']:.4f} over {full['val_tokens']:,} tokens")
    finally:
        teardown()
    return result
