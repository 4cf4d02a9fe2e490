"""GPU check (issue 18): GPT-2 124M training speed and MFU on one GPU, against transformers, plus the
overheads of FSDP2 at world size 1 and of async checkpointing. Synthetic tokens, no data needed; one JSON
line per phase, a summary line at the end. Meant to finish in under 5 minutes on one H100/H200:

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --tiny   # a smoke run of every phase on a CPU (figures meaningless)

Phases:
  matmul      measured bf16 matmul peak (8192^3), next to the datasheet's dense bf16 peak
  pocketlm    124M model (gpt2 arch, 12 x 768, vocab 50304, seq 1024), bf16 autocast, torch.compile,
              fused AdamW: tokens/s and MFU (6N + attention FLOPs per token, pocketlm's flops_per_token)
              against the datasheet and against the measured matmul peak
  transformers GPT2LMHeadModel (SDPA, compiled) at the same batch: tokens/s and pocketlm's ratio
  fsdp2       the same model through pocketlm's wrap_model("fsdp") (fully_shard per block, bf16 params and
              fp32 reductions on CUDA) at world size 1: overhead against the plain module
  checkpoint  pocketlm.train.dcp.save_state (DCP): a sync save against the blocking part of async_save
The test suite never needs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from common import train_step
from pocketlm.config import TrainConfig
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.train.optim import build_optimizers

# dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts), in FLOP/s
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def emit(phase: str, **fields) -> dict:
    row = {"phase": phase, **fields}
    print(json.dumps(row), flush=True)
    return row


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def datasheet_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def matmul_peak(device, n: int, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps (which include torch.compile's)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def model_config(a) -> ModelConfig:
    if a.tiny:
        return ModelConfig(arch="gpt2", vocab_size=512, n_layer=2, n_head=2, n_embd=64, block_size=a.seq, dropout=0.0)
    return ModelConfig(arch="gpt2", vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=a.seq, dropout=0.0)


def init_single_process_group(device):
    """FSDP2 and DCP need a process group; one rank of one, in this process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile happens here)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks that every phase runs")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.seq, a.batch, a.steps, a.warmup = min(a.seq, 64), min(a.batch, 4), min(a.steps, 3), min(a.warmup, 2)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    compile_ = (lambda m: m) if a.no_compile else torch.compile
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "config": vars(a)}

    peak = matmul_peak(device, 1024 if a.tiny or device.type != "cuda" else 8192)
    sheet = datasheet_peak(device)
    results["matmul"] = emit("matmul", measured_tflops=round(peak / 1e12, 3),
                             datasheet_tflops=sheet and round(sheet / 1e12), device=results["device"])

    torch.manual_seed(0)
    cfg = model_config(a)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=device)
    tokens = a.batch * a.seq
    tcfg = TrainConfig(lr=6e-4)

    ours = GPT(cfg).to(device).train()
    compiled = compile_(ours)
    sec = time_steps(train_step(ours, build_optimizers(ours, tcfg), x, lambda x: compiled(x, x)[1], device.type),
                     device, a.warmup, a.steps)
    flops = ours.flops_per_token(a.seq) * tokens / sec
    results["pocketlm"] = emit("pocketlm", params_M=round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
                               tokens_per_s=round(tokens / sec), step_ms=round(sec * 1e3, 1),
                               mfu_datasheet=sheet and round(flops / sheet, 3), mfu_measured_peak=round(flops / peak, 3))
    del ours, compiled

    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=a.seq, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                    n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                    attn_implementation="sdpa")).to(device).train()
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    hf_c = compile_(hf)
    hf_opt = [torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)]
    hf_sec = time_steps(train_step(hf, hf_opt, x, lambda x: hf_c(input_ids=x, labels=x).loss, device.type), device, a.warmup, a.steps)
    results["transformers"] = emit("transformers", tokens_per_s=round(tokens / hf_sec), step_ms=round(hf_sec * 1e3, 1),
                                   pocketlm_ratio=round(hf_sec / sec, 2))
    del hf, hf_c, hf_opt

    init_single_process_group(device)
    from pocketlm.train.dist import DistInfo, wrap_model

    torch.manual_seed(0)
    sharded = wrap_model(GPT(cfg).to(device).train(), "fsdp", DistInfo(device=device), bf16=True)  # as pretrain does
    sharded_c = compile_(sharded)
    opts = build_optimizers(sharded, tcfg)
    fsdp_sec = time_steps(train_step(sharded, opts, x, lambda x: sharded_c(x, x)[1], device.type), device, a.warmup, a.steps)
    results["fsdp2"] = emit("fsdp2", tokens_per_s=round(tokens / fsdp_sec), step_ms=round(fsdp_sec * 1e3, 1),
                            overhead=round(fsdp_sec / sec - 1, 3))

    from pocketlm.train.dcp import save_state

    root = tempfile.mkdtemp(prefix="gpu_check_ckpt_")
    try:
        t0 = time.perf_counter()
        save_state(os.path.join(root, "sync"), sharded, opts)
        sync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        future = save_state(os.path.join(root, "async"), sharded, opts, asynchronous=True)
        blocking_s = time.perf_counter() - t0  # the training loop waits only for this part
        future.result()
        async_total_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["checkpoint"] = emit("checkpoint", sync_s=round(sync_s, 3), async_blocking_s=round(blocking_s, 3),
                                 async_total_s=round(async_total_s, 3), blocking_share=round(blocking_s / sync_s, 3))
    import torch.distributed as dist

    dist.destroy_process_group()
    targets = {"mfu>=0.45": (results["pocketlm"]["mfu_datasheet"] or 0) >= 0.45,
               "vs_transformers>=1.3": results["transformers"]["pocketlm_ratio"] >= 1.3,
               "fsdp2_overhead<=0.03": results["fsdp2"]["overhead"] <= 0.03,
               "async_blocking<=0.10": results["checkpoint"]["blocking_share"] <= 0.10}
    emit("summary", targets=targets, device=results["device"])


if __name__ == "__main__":
    main()
