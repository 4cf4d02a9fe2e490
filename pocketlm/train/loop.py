"""The one training loop behind `pretrain` and `finetune`.

It takes a model, a TrainConfig and two batch sources, and owns everything a run needs: AdamW or
Muon, warmup + cosine / WSD schedule (stretched to a time budget), gradient accumulation and
clipping, bf16 autocast, optional torch.compile, periodic validation (loss, bits per byte), early
stopping with the best checkpoint kept. The parallel wrapper (FSDP2 or DDP under torchrun) comes from
pocketlm.train.dist, checkpoints and resume from pocketlm.train.checkpointer. With train.global_batch
the micro-batch and accumulation come from the world size (TrainConfig.for_world); the caller builds
its batch source with the same derived batch_size.

Resume reproduces the uninterrupted run bit for bit when the run is bounded by steps. With a time
budget (max_minutes) the lr schedule and the last step follow the clock (the wall's, or with
train.budget_clock: cpu the process's CPU time), so neither a resumed nor a repeated run matches another bit for bit; the resumed run continues the budget where it stopped.
Under torchrun the clock read is rank 0's, broadcast every step, so all ranks stop at the same step.

Batch sources:
    train_data.next_batch() -> (inputs, targets[, doc_ids, real_tokens])
        int64 (B, T); targets are -100 where not scored. doc_ids (B, T) or None: packed rows, see
        GPT.forward. real_tokens: the tokens that are not padding (default B*T); tokens/s and MFU count
        only those.
    train_data.state_dict() / load_state_dict(d)   the data cursor, saved in every checkpoint
    val_data(max_batches=None) -> iterator of (inputs, targets)   a fresh pass each call
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pocketlm.config import TrainConfig
from pocketlm.model.kernels import choice as kernel_choice
from pocketlm.train.checkpointer import Checkpointer
from pocketlm.train.dist import DistInfo, all_reduce_mean, choose_strategy, from_main, grad_sync, wrap_model
from pocketlm.train.metrics import MetricsLog, evaluate_lm, measured_peak_flops
from pocketlm.train.optim import build_optimizers, lr_factor, set_lr


def cpu_lacks_bf16(device: torch.device) -> bool:
    """An AVX2-only CPU has no native bf16 matmul: aten emulates it, ~20x slower than fp32 (measured on
    the demo's model on an AMD EPYC without AVX512: 32 s a step against 1.5 s)."""
    return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bf16" and not cpu_lacks_bf16(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unpack(batch, device):
    """(inputs, targets, doc_ids or None, real tokens) on `device`, from either form of batch."""
    x, y = batch[0].to(device), batch[1].to(device)
    if len(batch) == 2:
        return x, y, None, x.numel()
    doc_ids, real = batch[2], batch[3]
    return x, y, (None if doc_ids is None else doc_ids.to(device)), real


def train(model, tokenizer, cfg: TrainConfig, train_data, val_data, out_dir, *, resume: bool = False,
          dist: DistInfo | None = None, extra_config: dict | None = None, save_weights=None, load_weights=None,
          run_config: dict | None = None, varying_lengths: bool = False) -> dict:
    dist = dist or DistInfo()
    if cfg.dtype == "bf16" and cpu_lacks_bf16(dist.device):
        if dist.is_main:
            print("note: this CPU has no native bf16 (no AVX512-BF16 / AMX): training in fp32, which is faster here",
                  flush=True)
        cfg = dataclasses.replace(cfg, dtype="fp32")
    if cfg.dtype == "bf16" and dist.device.type == "cpu" and dist.is_main:
        print(kernel_choice().line(), flush=True)  # which hand-written kernels the step runs, and why not others
    cfg = cfg.for_world(dist.world_size)
    run_dir = Path(out_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            (run_dir / "config.json").write_text(json.dumps(run_config, indent=2))
    torch.manual_seed(cfg.seed + dist.rank)
    model.train()
    if choose_strategy(model, cfg.dist, dist) != "fsdp":  # FSDP2 moves each block to the device as it shards
        model.to(dist.device)                             # it: the whole model never sits on one GPU
    # before the optimizer: FSDP2 turns the parameters into DTensor shards in place
    step_model = parallel = wrap_model(model, cfg.dist, dist, bf16=cfg.dtype == "bf16")
    optimizers = build_optimizers(model, cfg)
    ckpt = Checkpointer(run_dir, model, tokenizer, optimizers, train_data, cfg, dist, extra_config, save_weights, load_weights)
    log = MetricsLog(run_dir, enabled=dist.is_main)

    state = {"elapsed": 0.0, "best_val": float("inf"), "bad_evals": 0, "tokens": 0, "first_step_s": 0.0}
    step = 0
    if resume:
        restored = ckpt.restore()
        if restored is not None:
            step = restored.pop("step")
            state.update({k: restored[k] for k in state if k in restored})
            log.truncate_after(step)
            if dist.is_main:
                print(f"resumed from step {step}")
    elif dist.is_main and log.file.exists():
        log.file.unlink()  # a fresh run starts a fresh log

    # batches of varying length (fine-tuning) compile once with symbolic shapes, not once per length
    dynamic = True if varying_lengths else None
    if cfg.compile and dist.device.type == "cpu":
        # dropout masks from aten's bernoulli_ rather than Inductor's per-element CPU random numbers, ~3x
        # slower: at dropout 0.2 those were the demo's largest cost after the matmuls (a step 0.84x as long)
        from torch._inductor import config as inductor_config
        inductor_config.fallback_random = True
    if cfg.compile and cfg.compile_scope == "blocks":
        for layer in model.layers:  # identical blocks share one compiled graph: a short cold start
            layer.compile(dynamic=dynamic)
    elif cfg.compile:
        step_model = torch.compile(step_model, dynamic=dynamic)
    autocast = autocast_ctx(cfg, dist.device)
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), device=dist.device)
    flops_per_token = functools.lru_cache(model.flops_per_token)
    peak = measured_peak_flops(torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, dist.device) * dist.world_size
    budget = cfg.max_minutes * 60
    clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter  # what the budget counts

    def run_eval(step: int) -> dict:
        if val_data is None:
            return {}
        result = evaluate_lm(model, val_data, byte_lengths, autocast, cfg.eval_batches)
        for k in ("val_loss", "val_bpb"):
            result[k] = all_reduce_mean(torch.tensor(result[k], device=dist.device)).item()
        return result

    # a time-budgeted run shows its progress in seconds of the budget, otherwise in steps
    bar = tqdm(total=round(budget) if budget else cfg.max_steps, initial=round(state["elapsed"]) if budget else step,
               unit="s" if budget else "step", desc="train", disable=not dist.is_main, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    t_start = clock() - state["elapsed"]
    t_window, window_tokens, window_flops = time.perf_counter(), 0.0, 0.0
    last_eval: dict = {}
    if cfg.eval_at_start and step == 0:
        state["initial_val"] = run_eval(0)
        if state["initial_val"]:
            log.write({"step": 0, **state["initial_val"]})
            bar.write(f"step 0: val loss {state['initial_val']['val_loss']:.4f}")
    stop_reason = "max_steps"
    while step < cfg.max_steps:
        # rank 0's clock decides the stop and the lr for every rank: ranks whose own clocks disagreed
        # would stop at different steps (a collective mismatch) and train with different lrs
        elapsed = from_main(clock() - t_start, dist.device) if budget else 0.0
        if budget and elapsed >= budget:
            stop_reason = "time budget"
            state["elapsed"] = elapsed  # (saved below: a resume with the same budget has nothing left, not one more step)
            break
        if step == 1 and budget:  # the first step's time, cold compile included, on rank 0's clock
            state["first_step_s"] = elapsed
        # a time budget's schedule spans the time left after the first step (the cold compile), not the wall clock
        warm = state["first_step_s"]
        progress = max(step / cfg.max_steps, (elapsed - warm) / (budget - warm) if budget else 0.0)
        set_lr(optimizers, cfg, lr_factor(cfg, progress, step))
        loss_sum = torch.zeros((), device=dist.device)  # summed on the device: no host sync per micro-batch
        step_tokens = step_flops = 0.0
        for micro in range(cfg.grad_accum):
            x, y, doc_ids, real = _unpack(train_data.next_batch(), dist.device)
            with grad_sync(parallel, enabled=micro == cfg.grad_accum - 1):
                with autocast:
                    _, loss = step_model(x, y, doc_ids=doc_ids)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            # model FLOPs of the real tokens, with the attention width this batch ran at
            step_tokens += real
            step_flops += real * flops_per_token(x.size(1))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step += 1
        totals = torch.stack([loss_sum.double() / cfg.grad_accum,
                              torch.tensor(step_tokens, dtype=torch.float64, device=dist.device),
                              torch.tensor(step_flops, dtype=torch.float64, device=dist.device)])
        if dist.world_size > 1:  # the loss is the ranks' mean; their tokens and FLOPs add up
            totals = all_reduce_mean(totals)
            totals[1:] *= dist.world_size
        loss_value, step_tokens, step_flops = totals.tolist()
        window_tokens += step_tokens
        window_flops += step_flops
        state["tokens"] += round(step_tokens)
        state["elapsed"] = clock() - t_start

        if step % cfg.log_every == 0 or step == 1:
            dt = time.perf_counter() - t_window
            tok_s, mfu = window_tokens / dt, window_flops / dt / peak
            t_window, window_tokens, window_flops = time.perf_counter(), 0.0, 0.0
            log.write({"step": step, "loss": loss_value, "lr": optimizers[0].param_groups[0]["lr"],
                       "tokens_per_s": tok_s, "mfu": mfu, "elapsed_s": state["elapsed"]})
            bar.set_postfix_str(f"step {step} | loss {loss_value:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%}")
        bar.update(min(round(state["elapsed"]), bar.total) - bar.n if budget else 1)

        last = step == cfg.max_steps
        if step % cfg.eval_every == 0 and not last:
            last_eval = run_eval(step)
            if last_eval:
                log.write({"step": step, **last_eval})
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, val bpb {last_eval['val_bpb']:.4f}")
                log.plot()
                if last_eval["val_loss"] < state["best_val"]:
                    state["best_val"], state["bad_evals"] = last_eval["val_loss"], 0
                    if cfg.early_stopping_patience:
                        ckpt.save(step, state, name="best")
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        stop_reason = f"early stopping (no val improvement in {state['bad_evals']} evals)"
                        break
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not last:
            ckpt.save(step, state, blocking=False)  # asynchronous on CUDA
    bar.close()

    final = run_eval(step)
    if final:
        log.write({"step": step, **final})
        if cfg.early_stopping_patience and final["val_loss"] < state["best_val"]:
            state["best_val"] = final["val_loss"]
            ckpt.save(step, state, name="best")
    ckpt.save(step, state)
    log.plot()
    result = {"step": step, "stop_reason": stop_reason, "elapsed_s": round(state["elapsed"], 1),
              "tokens": state["tokens"], **final}
    if state.get("initial_val"):
        result["initial_val_loss"] = state["initial_val"]["val_loss"]
    if cfg.early_stopping_patience and state["best_val"] < float("inf"):
        result["best_val_loss"] = state["best_val"]
    if dist.is_main:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result
