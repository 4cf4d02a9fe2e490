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

MAX_ROWS = 16  # activation rows the kernel takes (one AMX tile); beyond that (prefill) oneDNN is faster

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <type_traits>
#include <sys/syscall.h>
#include <unistd.h>

constexpr int64_t PF = 8;  // prefetch distance in rows: 8 and 4 were best of 4/8/16 (24 GB/s vs 15 oneDNN)
constexpr int64_t PFK = 2;  // AMX: prefetch distance in 32-column steps; 2 was best of 1/2/4

// One step of K along a weight row: 32 bf16 numbers (pairs summed by vdpbf16ps) or 16 fp32 ones (FMA).
template <typename T> constexpr int64_t STEP = std::is_same_v<T, float> ? 16 : 32;
template <typename T>
static inline __m512 madd(__m512 acc, const T* x, __m512i w) {
  if constexpr (std::is_same_v<T, float>) return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_castsi512_ps(w), acc);
  else return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), (__m512bh)w);
}
static inline float to_float(float v) { return v; }
static inline float to_float(uint16_t v) { return float(c10::bit_cast<at::BFloat16>(v)); }
static inline void from_float(float v, float& out) { out = v; }
static inline void from_float(float v, uint16_t& out) { out = c10::bit_cast<uint16_t>(at::BFloat16(v)); }

// Four weight rows w (contiguous, K each) against R activation rows x[0..R): y[r][i] = dot(x[r], w[i]).
// R > 1 loads each weight vector once for R activation rows (several streams decoding at once).
template <typename T, int R>
static inline void dot4(const T* x, int64_t K, const T* w, bool prefetch, float y[4][4]) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += STEP<T>) {
    if (prefetch)  // fetch the rows after next while these four are summed
      for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (PF + i) * K + k), _MM_HINT_T0);
    __m512i wv[4];
    for (int i = 0; i < 4; ++i) wv[i] = _mm512_loadu_si512(w + i * K + k);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = madd(a[r][i], x + r * K + k, wv[i]);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) y[r][i] = _mm512_reduce_add_ps(a[r][i]);
}

template <typename T>
struct Gemv {  // y[m, n] = dot(x[m, :], w[n, :]) (+ b[n]): fp32 sums, out in T
  const T *x, *w, *b;
  T* y;
  int64_t M, K, N;
  void out(int64_t m, int64_t n, float v) const { from_float(b ? v + to_float(b[n]) : v, y[m * N + n]); }

  void avx_rows(int64_t n0, int64_t n1) const {  // output columns [n0, n1), weight rows in groups of 4
    for (int64_t n = n0; n + 4 <= n1; n += 4) {
      float v[4][4];
      int64_t m = 0;
      auto emit = [&](int rows) {
        for (int r = 0; r < rows; ++r)
          for (int i = 0; i < 4; ++i) out(m + r, n + i, v[r][i]);
        m += rows;
      };
      while (M - m >= 4) dot4<T, 4>(x + m * K, K, w + n * K, m == 0, v), emit(4);
      if (M - m >= 2) dot4<T, 2>(x + m * K, K, w + n * K, m == 0, v), emit(2);
      if (M - m == 1) dot4<T, 1>(x + m * K, K, w + n * K, m == 0, v), emit(1);
    }
    for (int64_t n = n1 - (n1 - n0) % 4; n < n1; ++n)  // the last (n1 - n0) % 4 rows
      for (int64_t m = 0; m < M; ++m) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += STEP<T>) a = madd(a, x + m * K + k, _mm512_loadu_si512(w + n * K + k));
        out(m, n, _mm512_reduce_add_ps(a));
      }
  }

  void run() const {
    at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t q0, int64_t q1) { avx_rows(q0 * 4, std::min(q1 * 4, N)); });
  }
};

template <typename T>
static Gemv<T> prepare(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       at::ScalarType dtype, at::Tensor& y) {  // x and bias: contiguous (the caller holds them)
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: shapes");
  TORCH_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype, "gemv: x and weight must be ", dtype);
  TORCH_CHECK(w.is_contiguous() && w.size(1) % STEP<T> == 0, "gemv: contiguous weight, K % ", STEP<T>, " == 0");
  TORCH_CHECK(x.size(0) <= 16, "gemv: at most 16 rows");
  TORCH_CHECK(x.is_contiguous() && (!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == dtype)));
  y = at::empty({x.size(0), w.size(0)}, x.options());
  auto ptr = [](const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); };  // (at::BFloat16 as raw bits)
  return {ptr(x), ptr(w), bias.has_value() ? ptr(*bias) : nullptr, ptr(y), x.size(0), x.size(1), w.size(0)};
}

#ifndef POCKETLM_NO_AMX
// Several streams (2..16 rows) on AMX: C[n][m] += W[16 rows n][32 columns k] . Xt[k pairs][m], so the
// weights load as they lie (16 rows per tile, one cache line each) and only the few activation rows
// are transposed, into pairs of bf16 per 32-bit element. tmm0: activations, tmm1-3: weights,
// tmm4-7: sums for up to four blocks of 16 weight rows.
static bool amx_ready() {  // Linux hands out the tile state only on request (arch_prctl, kernel >= 5.16)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

template <int B>
static inline void amx_blocks(const char* w0, int64_t ws, int64_t K, const uint32_t* xt, int64_t M, float* c) {
  _tile_zero(4);
  if (B >= 2) _tile_zero(5);
  if (B >= 3) _tile_zero(6);
  if (B >= 4) _tile_zero(7);
  for (int64_t k = 0; k < K; k += 32) {
    if (k + PFK * 32 < K)
      for (int r = 0; r < B * 16; ++r) _mm_prefetch(w0 + r * ws + (k + PFK * 32) * 2, _MM_HINT_T0);
    _tile_loadd(0, xt + (k / 2) * M, M * 4);
    _tile_loadd(1, w0 + k * 2, ws);
    _tile_dpbf16ps(4, 1, 0);
    if (B >= 2) { _tile_loadd(2, w0 + 16 * ws + k * 2, ws); _tile_dpbf16ps(5, 2, 0); }
    if (B >= 3) { _tile_loadd(3, w0 + 32 * ws + k * 2, ws); _tile_dpbf16ps(6, 3, 0); }
    if (B >= 4) { _tile_loadd(1, w0 + 48 * ws + k * 2, ws); _tile_dpbf16ps(7, 1, 0); }
  }
  _tile_stored(4, c, M * 4);
  if (B >= 2) _tile_stored(5, c + 16 * M, M * 4);
  if (B >= 3) _tile_stored(6, c + 32 * M, M * 4);
  if (B >= 4) _tile_stored(7, c + 48 * M, M * 4);
}

static void amx_gemv(const Gemv<uint16_t>& g) {
  std::vector<uint32_t> xt(g.K / 2 * g.M);  // xt[k/2][m] = (x[m][k], x[m][k+1])
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(g.x);
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t k = 0; k < g.K / 2; ++k) xt[k * g.M + m] = x32[m * (g.K / 2) + k];
  const int64_t M = g.M, ws = g.K * 2, blocks = g.N / 16;
  at::parallel_for(0, blocks + 1, 1, [&](int64_t b0, int64_t b1) {
    if (b1 > blocks) g.avx_rows(blocks * 16, g.N), b1 = blocks;  // rows past the last whole block
    if (b0 >= b1) return;
    TileConfig cfg;
    cfg.rows[0] = 16, cfg.colsb[0] = M * 4;
    for (int t = 1; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    for (int t = 4; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = M * 4;
    _tile_loadconfig(&cfg);
    alignas(64) float c[64 * 16];
    const __m512i row = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(M));
    for (int64_t b = b0; b < b1;) {
      const int nb = b1 - b >= 4 ? 4 : b1 - b >= 2 ? 2 : 1;
      const char* w0 = reinterpret_cast<const char*>(g.w) + b * 16 * ws;
      if (nb == 4) amx_blocks<4>(w0, ws, g.K, xt.data(), M, c);
      else if (nb == 2) amx_blocks<2>(w0, ws, g.K, xt.data(), M, c);
      else amx_blocks<1>(w0, ws, g.K, xt.data(), M, c);
      for (int j = 0; j < nb; ++j) {  // c[16 rows n][M] -> y[m][n0, n0 + 16) plus bias, 16 outputs at a time
        const int64_t n0 = (b + j) * 16;
        const __m512 bv = g.b ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(g.b + n0))), 16))
                              : _mm512_setzero_ps();
        for (int64_t m = 0; m < M; ++m) {
          const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(row, c + j * 16 * M + m, 4), bv);
          _mm256_storeu_si256((__m256i*)(g.y + m * g.N + n0), (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
      b += nb;
    }
    _tile_release();
  });
}
#endif

static std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

static at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  at::Tensor y, xc = x.contiguous();
  const auto bc = contiguous(bias);
  const auto g = prepare<uint16_t>(xc, w, bc, at::kBFloat16, y);
#ifndef POCKETLM_NO_AMX
  if (g.M >= 2 && amx_ready()) return amx_gemv(g), y;  // one row: the AVX512 loop streams faster
#endif
  g.run();
  return y;
}

// fp32: MKL's sgemm reads SmolLM2's weights at 27 GB/s for one row but 11 GB/s for 8; this keeps ~the one-row pace
static at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  at::Tensor y, xc = x.contiguous();
  const auto bc = contiguous(bias);
  prepare<float>(xc, w, bc, at::kFloat, y).run();
  return y;
}

static bool bf16_gemv_uses_amx() {
#ifndef POCKETLM_NO_AMX
  return amx_ready();
#else
  return false;
#endif
}

TORCH_LIBRARY(pocketlm, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_gemv_uses_amx() -> bool", &bf16_gemv_uses_amx);
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("f32_gemv", &f32_gemv);
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
    from torch.utils.cpp_extension import load_inline
    try:  # torch runs `ninja` from PATH; the pip package's copy is not on it unless the venv is activated
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    flags = ["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"]
    errors = []
    # a compiler too old for the AMX intrinsics (GCC < 11) still builds the AVX512 half
    for name, extra in (("pocketlm_bf16_gemv_amx", ["-mamx-tile", "-mamx-bf16"]),
                        ("pocketlm_bf16_gemv", ["-DPOCKETLM_NO_AMX"])):
        try:
            load_inline(name, cpp_sources=[_SOURCE], is_python_module=False, extra_cflags=flags + extra,
                        extra_ldflags=["-fopenmp"])
            break
        except Exception as e:  # noqa: PERF203 (no compiler, or an unusual toolchain: oneDNN still works)
            errors.append(f"{type(e).__name__}: {e}")
    else:
        warnings.warn(f"bf16 decode kernel unavailable, using oneDNN ({errors[-1]})")
        return False

    for op in ("pocketlm::bf16_gemv", "pocketlm::f32_gemv"):
        torch.library.register_fake(op)(lambda x, weight, bias: x.new_empty(x.size(0), weight.size(0)))
    return True


def uses_amx() -> bool:
    """Whether batches of 2..MAX_ROWS rows run on the AMX tile unit (CPU, compiler and kernel permitting)."""
    return available() and torch.ops.pocketlm.bf16_gemv_uses_amx()


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.pocketlm.bf16_gemv(x, weight, bias)


def f32_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.pocketlm.f32_gemv(x, weight, bias)
