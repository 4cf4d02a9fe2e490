"""A bf16 matrix-vector kernel for decoding on CPUs with AVX512-BF16.

At batch 1 a decode step reads every weight once, so its speed is the speed at which the kernel
streams weights from memory. oneDNN's bf16 matmul, made for large batches, reads a few rows of
activations at ~14 GB/s here where fp32 MKL reaches ~21 GB/s (the machine's read bandwidth), so
bf16, with half the bytes, was barely faster than fp32. This kernel is a plain dot product per
output row with the AVX512-BF16 `vdpbf16ps` instruction (pairs of bf16 products summed into fp32),
four weight rows at a time against up to four activation rows (several streams share each weight
load), with a software prefetch of the weight rows two groups ahead: 24 GB/s over SmolLM2's 120
matrices here at one row, 1.6x oneDNN's packed kernel. No library ships a bf16 GEMV for CPUs,
hence this one.

It registers `torch.ops.pocketlm.bf16_gemv(x, weight, bias)` (x: (M, K) bf16 with small M; weight:
(N, K) bf16; K a multiple of 32) -> (M, N) bf16, built once with the C++ compiler torch.compile also
uses and cached by torch (~/.cache/torch_extensions). `available()` is False, and callers use
oneDNN, where the CPU lacks the instruction or the build fails.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

MAX_ROWS = 8  # activation rows the kernel takes; beyond that (prefill) the matmul libraries are faster

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

constexpr int64_t PF = 8;  // prefetch distance in rows: 8 and 4 were best of 4/8/16 (24 GB/s vs 15 oneDNN)

// Four weight rows w (contiguous, K each) against R activation rows x[0..R): y[r][i] = dot(x[r], w[i]).
// R > 1 loads each weight vector once for R activation rows (several streams decoding at once).
template <int R>
static inline void dot4(const uint16_t* x, int64_t K, const uint16_t* w, bool prefetch, float y[4][4]) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if (prefetch)  // fetch the rows after next while these four are summed
      for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (PF + i) * K + k), _MM_HINT_T0);
    __m512bh wv[4];
    for (int i = 0; i < 4; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(w + i * K + k);
    for (int r = 0; r < R; ++r) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_dpbf16_ps(a[r][i], xv, wv[i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) y[r][i] = _mm512_reduce_add_ps(a[r][i]);
}

// y[m, n] = dot(x[m, :], w[n, :]) (+ b[n]) for bf16 x (M, K), w (N, K); fp32 sums, bf16 out.
static at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_gemv: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: bf16 only");
  TORCH_CHECK(w.is_contiguous() && w.size(1) % 32 == 0, "bf16_gemv: contiguous weight, K % 32 == 0");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto y = at::empty({M, N}, xc.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const at::BFloat16* bp = bias.has_value() ? bias->contiguous().data_ptr<at::BFloat16>() : nullptr;
  auto out = [&](int64_t m, int64_t n, float v) { yp[m * N + n] = at::BFloat16(bp ? v + float(bp[n]) : v); };
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g * 4;
      if (n + 4 <= N) {
        const uint16_t* w4 = wp + n * K;
        float v[4][4];
        int64_t m = 0;
        auto emit = [&](int rows) {
          for (int r = 0; r < rows; ++r)
            for (int i = 0; i < 4; ++i) out(m + r, n + i, v[r][i]);
          m += rows;
        };
        while (M - m >= 4) dot4<4>(xp + m * K, K, w4, m == 0, v), emit(4);
        if (M - m >= 2) dot4<2>(xp + m * K, K, w4, m == 0, v), emit(2);
        if (M - m == 1) dot4<1>(xp + m * K, K, w4, m == 0, v), emit(1);
      } else {  // the last N % 4 rows
        for (int64_t r = n; r < N; ++r) {
          for (int64_t m = 0; m < M; ++m) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 32)
              a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(xp + m * K + k),
                                   (__m512bh)_mm512_loadu_si512(wp + r * K + k));
            out(m, r, _mm512_reduce_add_ps(a));
          }
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY(pocketlm, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("bf16_gemv", &bf16_gemv);
}
"""


def _cpu_has_bf16_dot() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags


@functools.cache
def available() -> bool:
    """Builds (once per machine) and loads the kernel; False where it cannot run here."""
    if not _cpu_has_bf16_dot():
        return False
    try:
        from torch.utils.cpp_extension import load_inline
        try:  # torch runs `ninja` from PATH; the pip package's copy is not on it unless the venv is activated
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        load_inline("pocketlm_bf16_gemv", cpp_sources=[_SOURCE], is_python_module=False,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, or an unusual toolchain: oneDNN still works
        warnings.warn(f"bf16 decode kernel unavailable, using oneDNN ({type(e).__name__}: {e})")
        return False

    @torch.library.register_fake("pocketlm::bf16_gemv")
    def _(x, weight, bias):
        return x.new_empty(x.size(0), weight.size(0))
    return True


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.pocketlm.bf16_gemv(x, weight, bias)
