"""Helpers shared by the benchmark scripts: the machine banner and interleaved timing."""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    flags = []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
                break
    except OSError:
        pass
    import os
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads}


def print_machine(threads: int) -> dict:
    torch.set_num_threads(threads)
    info = machine_info(threads)
    print("machine:", json.dumps(info))
    return info


def interleaved(runners: dict, reps: int = 5) -> dict:
    """Time each runner `reps` times in A B A B order (after the caller's warm-up);
    returns {name: {"median": s, "min": s, "max": s}}."""
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(t), "min": min(t), "max": max(t)} for n, t in times.items()}


def train_step(model, optimizers, x, forward, device_type: str = "cpu"):
    """One training step under bf16 autocast as a closure: forward(x) -> loss, backward, every optimizer."""
    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = forward(x)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def decode_step_ms(model, decode, store, steps: int = 64, warmup: int = 8) -> float:
    """ms per batch-1 decode step: an 8-token prefill in slot 0 of `store`, `warmup` steps, then `steps`
    timed ones of `decode` (the engine's step: cstep.decoder's, or the model itself)."""
    store.free(0)
    store.allocate()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model(ids, batch=store.step(0, 1, ids))
    nxt = torch.tensor([[9]])
    for _ in range(warmup):
        decode(nxt, batch=store.step(0, 1, nxt))
    t = time.perf_counter()
    for _ in range(steps):
        decode(nxt, batch=store.step(0, 1, nxt))
    return 1000 * (time.perf_counter() - t) / steps
