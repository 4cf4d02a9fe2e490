"""Matrix-vector kernels for decoding on CPUs with AVX512-BF16 (C++ in pocketlm/csrc/gemv.cpp).

A decode step reads every weight once for a few activation rows (one per stream), so its speed is the
speed at which the kernel streams weights from memory. The matmul libraries are made for many rows:
here oneDNN's bf16 matmul reads SmolLM2's weights at ~14 GB/s for one row (fp32 MKL: ~27, the
machine's read bandwidth), MKL's fp32 sgemm drops to ~11 GB/s at 8 rows and aten's int8 weight-only
kernel is bound by arithmetic well below bandwidth. These kernels keep close to the bandwidth from 1
to 16 rows (measured on 2 cores over SmolLM2's matrices; BENCHMARKS.md has the figures):

- one row: an AVX512 dot product per weight row, four rows at a time with a software prefetch ahead
  (vdpbf16ps sums pairs of bf16 products into fp32; int8 weights are widened to bf16 on the fly);
- 2..16 rows of bf16 or int8 weights: the AMX tile unit, weights as the tiles' left side as they lie
  in memory, only the few activation rows transposed; 16 rows take ~1.3x the time of one.

No library ships these for CPUs, hence this file. Ops (`torch.ops.pocketlm.*`, traceable by
torch.compile): bf16_gemv(x, weight, bias), f32_gemv(x, weight, bias), int8_gemv(x, weight, scale, bias),
x (M <= MAX_ROWS, K) and weight (N, K) with K a multiple of 32. Built once per machine by pocketlm.native.
`available()` is False where the CPU lacks AVX512-BF16 or the build fails; callers then use aten.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from pocketlm import native

MAX_ROWS = 16  # activation rows the kernel takes (one AMX tile); beyond that (prefill) oneDNN is faster


def enabled() -> bool:
    """POCKETLM_KERNELS=0 turns every hand-written decode kernel off (aten's paths run instead)."""
    return os.environ.get("POCKETLM_KERNELS", "1") != "0"


def available() -> bool:
    """Whether the kernels run here: enabled, and built and loaded (once per machine)."""
    return enabled() and _built()


def why_not() -> str | None:
    """Why the kernels are off (None where they run)."""
    if not enabled():
        return "POCKETLM_KERNELS=0"
    if not native.has("avx512_bf16"):
        return "no AVX512-BF16"
    return None if _built() else "build failed"


@functools.cache
def _built() -> bool:
    if not native.has("avx512_bf16"):
        return False
    errors = []
    # a compiler too old for the AMX intrinsics (GCC < 11) still builds the AVX512 half
    for name, extra in (("pocketlm_gemv_amx", native.AMX_FLAGS), ("pocketlm_gemv", ["-DPOCKETLM_NO_AMX"])):
        try:
            native.build(name, "gemv.cpp", extra)
            break
        except Exception as e:  # noqa: PERF203 (no compiler, or an unusual toolchain: oneDNN still works)
            errors.append(f"{type(e).__name__}: {e}")
    else:
        warnings.warn(f"decode kernels unavailable, using aten's matmuls ({errors[-1]})")
        return False
    if errors and native.has("amx_bf16"):
        warnings.warn(f"decode kernels built without AMX, slower for several streams ({errors[0]})")

    def shape(x, weight, *rest):  # what torch.compile traces in place of the kernels
        return x.new_empty(x.size(0), weight.size(0))
    for op in ("pocketlm::bf16_gemv", "pocketlm::f32_gemv", "pocketlm::int8_gemv"):
        torch.library.register_fake(op)(shape)
    return True


def uses_amx() -> bool:
    """Whether batches of 2..MAX_ROWS rows run on the AMX tile unit (CPU, compiler and kernel permitting)."""
    return available() and torch.ops.pocketlm.gemv_uses_amx()


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.pocketlm.bf16_gemv(x, weight, bias)


def f32_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.pocketlm.f32_gemv(x, weight, bias)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) bf16 against int8 weight rows (N, K) times a bf16 scale per row (N,)."""
    return torch.ops.pocketlm.int8_gemv(x, weight, scale, bias)
