"""Decode kernels alone: pocketlm's gemv kernels against aten's matmuls on SmolLM2-135M's matrix shapes.

    .venv/bin/python benchmarks/gemv_speed.py [--rows 1 2 4 8 16] [--reps 7]

One pass reads every weight matrix a decode step reads (30 layers of fused q/k/v, o, fused gate/up
and down, then the 49152 x 576 LM head), as the fused engine lays them out, for 1..16 activation rows
(streams). Random weights: speed does not depend on the values. Per precision and row count it prints
the best-of-reps time of a pass for pocketlm's kernel (pocketlm/csrc/gemv.cpp) and for aten's
(F.linear through MKL or oneDNN; torch._weight_int8pack_mm), the read rate and the ratio. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import print_machine
from pocketlm.infer import gemv

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # SmolLM2-135M, fused


def best_pass(fn, weights, xs, reps: int) -> float:
    fn(xs[weights[0][0].size(1)], *weights[0])  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for w in weights:
            fn(xs[w[0].size(1)], *w)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    info = print_machine(a.threads)
    if not gemv.available():
        raise SystemExit("the gemv kernels do not run here (no AVX512-BF16 or no C++ compiler)")
    print(f"AMX for 2..16 rows: {gemv.uses_amx()}")
    torch.manual_seed(0)
    precisions = {
        "fp32": ([(torch.randn(n, k),) for n, k in SHAPES], torch.float32,
                 lambda x, w: gemv.f32_gemv(x, w), lambda x, w: F.linear(x, w)),
        "bf16": ([(torch.randn(n, k).bfloat16(),) for n, k in SHAPES], torch.bfloat16,
                 lambda x, w: gemv.bf16_gemv(x, w), lambda x, w: F.linear(x, w)),
        "int8": ([(torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 100).bfloat16())
                  for n, k in SHAPES], torch.bfloat16,
                 lambda x, w, s: gemv.int8_gemv(x, w, s), lambda x, w, s: torch._weight_int8pack_mm(x, w, s)),
    }
    results = {}
    for name, (weights, dtype, ours, aten) in precisions.items():
        nbytes = sum(t.numel() * t.element_size() for w in weights for t in w)
        for rows in a.rows:
            xs = {k: torch.randn(rows, k).to(dtype) for k in (576, 1536)}
            t_ours, t_aten = best_pass(ours, weights, xs, a.reps), best_pass(aten, weights, xs, a.reps)
            results[f"{name}_rows{rows}"] = {"pocketlm_ms": t_ours * 1e3, "aten_ms": t_aten * 1e3,
                                             "pocketlm_GBps": nbytes / t_ours / 1e9, "ratio": t_aten / t_ours}
            print(f"{name} {rows:2d} rows: pocketlm {t_ours * 1e3:6.2f} ms ({nbytes / t_ours / 1e9:4.1f} GB/s)  "
                  f"aten {t_aten * 1e3:6.2f} ms ({nbytes / t_aten / 1e9:4.1f} GB/s)  -> {t_aten / t_ours:.2f}x", flush=True)
    print(json.dumps({"benchmark": "gemv_speed", "machine": info, "results": results}))


if __name__ == "__main__":
    main()
