"""One quantized matrix at a prompt's row counts: aten's weight-only int4 and int8 kernels (what the
engine's quantized linears run for a decode step) against oneDNN's packed bf16 matmul on a bf16 copy of
the same weights (what they run from DENSE_ROWS tokens a row, pocketlm/infer/linears.py).

    python benchmarks/prefill_matmul.py [--n 3072 --k 576 --threads 2]

Prints ms per product (best of 3 runs of --iters) and packed bf16's speed-up over the int4 kernel per
row count: the measurement behind linears.DENSE_ROWS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocketlm.infer.linears import Int4Linear, Int8Linear, PackedLinear, cpu_kind  # noqa: E402


def best_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t) / iters * 1e3)
    return min(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3072, help="output features (SmolLM2's fused gate/up: 3072)")
    ap.add_argument("--k", type=int, default=576, help="input features")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 256])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = torch.randn(args.n, args.k, generator=torch.Generator().manual_seed(0)) * 0.02
    int4, int8, dense = Int4Linear(w, None), Int8Linear(w, None), PackedLinear(w, None)
    print(f"{cpu_kind()}, {args.threads} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}; "
          f"a {args.n} x {args.k} matrix, ms per product")
    with torch.inference_mode():
        for m in args.rows:
            x = torch.randn(m, args.k).to(torch.bfloat16)
            a, b, c = (best_ms(lambda f=f: f(x), args.iters) for f in (int4, int8, dense))
            print(f"rows {m:4d}: int4 kernel {a:7.3f}  int8 kernel {b:7.3f}  packed bf16 {c:7.3f}  "
                  f"bf16 / int4 speed-up {a / c:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
