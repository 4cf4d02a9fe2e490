"""The bf16 training kernels (pocketlm/csrc/train_attention.cpp, train_kernels.cpp) against what runs without
them, one layer's work.

Each group runs in this process, interleaved, on the shapes of the train_speed model (batch 16 x 256
tokens, 4 heads of 64, MLP 1024, vocabulary 2048): forward and backward together.
- attention: the kernel on the tile unit where the CPU grants AMX, otherwise on AVX512-BF16 (vdpbf16ps
  blocks; on an AMX CPU as `avx512_kernel` beside it); aten's SDPA (flash forward and backward); and the compiled fallback pocketlm runs without the
  kernel (flash forward, batched-matmul backward through Inductor).
- GELU: the kernel against Inductor's compiled tanh-form GELU.
- cross-entropy: the kernel against Inductor's compiled cross_entropy over the bf16 logits cast to fp32.

    .venv/bin/python benchmarks/train_kernels.py [--reps 20]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from common import interleaved, print_machine
from pocketlm.model import kernels
from pocketlm.model.gpt import gelu_tanh


def fwd_bwd(fn, inputs, grad):
    def run():
        ins = [x.detach().requires_grad_() for x in inputs]
        torch.autograd.grad(fn(*ins), ins, grad)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    info = print_machine(a.threads)
    if not kernels.available():
        raise SystemExit(f"the training kernels cannot run on this machine ({kernels.choice().why})")
    print(kernels.choice().line())
    torch.manual_seed(0)
    B, H, T, D, hidden, V = 16, 4, 256, 64, 1024, 2048
    q, k, v, g = (torch.randn(B, T, H, D).to(torch.bfloat16).transpose(1, 2) for _ in range(4))
    u, du = (torch.randn(B * T, hidden).to(torch.bfloat16) for _ in range(2))
    logits, targets = (torch.randn(B * T, V) * 3).to(torch.bfloat16), torch.randint(0, V, (B * T,))
    one = torch.tensor(1.0)
    amx = kernels.choice().attention == kernels.AMX

    def plain_gelu(x):  # gelu_tanh without the kernel (it takes the kernel for bf16 with gradients)
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))

    groups = {
        "attention": {
            "kernel": fwd_bwd(lambda *x: kernels.kernel_attention(*x, amx=amx), (q, k, v), g),
            **({"avx512_kernel": fwd_bwd(lambda *x: kernels.kernel_attention(*x, amx=False), (q, k, v), g)} if amx else {}),
            "aten_sdpa": fwd_bwd(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), (q, k, v), g),
            "compiled_fallback": fwd_bwd(torch.compile(kernels.CausalAttention.apply), (q, k, v), g),
        },
        "gelu": {
            "kernel": fwd_bwd(gelu_tanh, (u,), du),
            "inductor": fwd_bwd(torch.compile(plain_gelu), (u,), du),
        },
        "cross_entropy": {
            "kernel": fwd_bwd(lambda x: kernels.FusedCrossEntropy.apply(x, targets), (logits,), one),
            "inductor": fwd_bwd(torch.compile(lambda x: F.cross_entropy(x.float(), targets)), (logits,), one),
        },
    }
    out = {}
    for group, runners in groups.items():
        for run in runners.values():  # warm-up, compiles
            run(), run()
        res = interleaved(runners, a.reps)
        best = {n: r["min"] * 1e3 for n, r in res.items()}
        for n, ms in best.items():
            print(f"{group:14s} {n:18s} {ms:7.2f} ms  (median {res[n]['median'] * 1e3:.2f})")
        for n in best:
            if n != "kernel":
                print(f"{group:14s} kernel is {best[n] / best['kernel']:.2f}x {n}")
        out[group] = best
    print(json.dumps({"benchmark": "train_kernels", "machine": info, "ms_best": out}))


if __name__ == "__main__":
    main()
