// Decode-step matrix products for a few activation rows: y (M, N) = x (M, K) . w (N, K)^T (+ b), M <= 16.
// Built and loaded by pocketlm/infer/gemv.py, which says why they exist. Three weight formats:
//   bf16_gemv  bf16 x, bf16 w             fp32 sums, bf16 out
//   f32_gemv   fp32 x, fp32 w             fp32 sums, fp32 out
//   int8_gemv  bf16 x, int8 w * scale[n]  weights widened to bf16 on the fly, fp32 sums, bf16 out
// One row runs an AVX512 loop (four weight rows at a time, a software prefetch ahead of them); 2..16
// bf16 or int8 rows run on the AMX tile unit where the CPU and kernel allow it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "common.h"
#include <type_traits>
#include <utility>

constexpr int64_t PF = 8;   // AVX512: prefetch distance in rows; 8 and 4 were best of 4/8/16
constexpr int64_t PFK = 2;  // AMX: prefetch distance in 32-column steps; 2 was best of 1/2/4

// ---- element helpers -------------------------------------------------------------------------------
// One step along K: 32 bf16 inputs (pairs summed by vdpbf16ps) or 16 fp32 ones (FMA).
template <typename X> constexpr int64_t STEP = std::is_same_v<X, float> ? 16 : 32;

// 32 int8 weights -> 32 bf16 (exact: |q| <= 127 fits bf16's 8-bit significand), in memory order
static inline __m512i int8x32_to_bf16(const int8_t* p) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

template <typename W>
static inline __m512i load_w(const W* p) {
  if constexpr (std::is_same_v<W, int8_t>) return int8x32_to_bf16(p);
  else return _mm512_loadu_si512(p);
}

template <typename X>
static inline __m512 madd(__m512 acc, const X* x, __m512i w) {
  if constexpr (std::is_same_v<X, float>) return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_castsi512_ps(w), acc);
  else return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x), (__m512bh)w);
}

static inline float to_float(float v) { return v; }
static inline float to_float(bf16 v) { return float(c10::bit_cast<at::BFloat16>(v)); }
static inline void store(float v, float& out) { out = v; }
static inline void store(float v, bf16& out) { out = c10::bit_cast<bf16>(at::BFloat16(v)); }

// ---- AVX512: any row count, fastest at one ---------------------------------------------------------
// Four weight rows w (contiguous, K each) against R activation rows x[0..R): y[r][i] = dot(x[r], w[i]).
// R > 1 loads each weight vector once for R activation rows.
template <typename X, typename W, int R>
static inline void dot4(const X* x, int64_t K, const W* w, bool prefetch, float y[4][4]) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += STEP<X>) {
    if (prefetch)  // fetch the rows after next while these four are summed
      for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (PF + i) * K + k), _MM_HINT_T0);
    __m512i wv[4];
    for (int i = 0; i < 4; ++i) wv[i] = load_w(w + i * K + k);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = madd(a[r][i], x + r * K + k, wv[i]);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) y[r][i] = _mm512_reduce_add_ps(a[r][i]);
}

template <typename X, typename W>
struct Gemv {
  const X* x;
  const W* w;
  const X* b;        // bias or nullptr
  const bf16* scale;  // int8: one scale per weight row
  X* y;
  int64_t M, K, N;

  void out(int64_t m, int64_t n, float v) const {
    if constexpr (std::is_same_v<W, int8_t>) v *= to_float(scale[n]);
    store(b ? v + to_float(b[n]) : v, y[m * N + n]);
  }

  void avx_rows(int64_t n0, int64_t n1) const {  // output columns [n0, n1), weight rows in groups of 4
    for (int64_t n = n0; n + 4 <= n1; n += 4) {
      float v[4][4];
      int64_t m = 0;
      auto emit = [&](int rows) {
        for (int r = 0; r < rows; ++r)
          for (int i = 0; i < 4; ++i) out(m + r, n + i, v[r][i]);
        m += rows;
      };
      while (M - m >= 4) dot4<X, W, 4>(x + m * K, K, w + n * K, m == 0, v), emit(4);
      if (M - m >= 2) dot4<X, W, 2>(x + m * K, K, w + n * K, m == 0, v), emit(2);
      if (M - m == 1) dot4<X, W, 1>(x + m * K, K, w + n * K, m == 0, v), emit(1);
    }
    for (int64_t n = n1 - (n1 - n0) % 4; n < n1; ++n)  // the last (n1 - n0) % 4 rows
      for (int64_t m = 0; m < M; ++m) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += STEP<X>) a = madd(a, x + m * K + k, load_w(w + n * K + k));
        out(m, n, _mm512_reduce_add_ps(a));
      }
  }

  void avx() const {
    at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t q0, int64_t q1) { avx_rows(q0 * 4, std::min(q1 * 4, N)); });
  }
};

// ---- AMX: 2..16 rows --------------------------------------------------------------------------------
// C[n][m] += W[16 rows n][32 columns k] . Xt[16 pairs k][m]: the weights are the tiles' left side, as
// they lie in memory (16 rows, one cache line each; int8 rows are widened to bf16 in a 1 KiB buffer
// first), and only the few activation rows are transposed, into pairs of bf16 per 32-bit element.
// Tiles: tmm0 activations, tmm1-3 weights, tmm4-7 sums for up to four blocks of 16 weight rows.
#ifndef POCKETLM_NO_AMX
// Where a weight tile (16 rows from w, columns k..k+32) loads from, and its row stride in bytes: the
// weights themselves, or for int8 the 16 x 32 bf16 they widen to in buf.
template <typename W>
static inline std::pair<const void*, int64_t> tile_source(const W* w, int64_t K, int64_t k, bf16* buf) {
  if constexpr (std::is_same_v<W, int8_t>) {
    for (int r = 0; r < 16; ++r) _mm512_store_si512(buf + r * 32, int8x32_to_bf16(w + r * K + k));
    return {buf, 64};
  } else {
    return {w + k, K * sizeof(W)};
  }
}

template <typename W, int B>
static inline void amx_blocks(const W* w0, int64_t K, const uint32_t* xt, int64_t M, float* c, bf16* buf) {
  _tile_zero(4);
  if (B >= 2) _tile_zero(5);
  if (B >= 3) _tile_zero(6);
  if (B >= 4) _tile_zero(7);
  for (int64_t k = 0; k < K; k += 32) {
    if (k + PFK * 32 < K)
      for (int r = 0; r < B * 16; ++r) _mm_prefetch((const char*)(w0 + r * K + k + PFK * 32), _MM_HINT_T0);
    _tile_loadd(0, xt + (k / 2) * M, M * 4);
    // (the tile numbers must be literals: the intrinsics paste them into the instruction)
    { auto [p, s] = tile_source(w0, K, k, buf); _tile_loadd(1, p, s); _tile_dpbf16ps(4, 1, 0); }
    if (B >= 2) { auto [p, s] = tile_source(w0 + 16 * K, K, k, buf + 512); _tile_loadd(2, p, s); _tile_dpbf16ps(5, 2, 0); }
    if (B >= 3) { auto [p, s] = tile_source(w0 + 32 * K, K, k, buf + 1024); _tile_loadd(3, p, s); _tile_dpbf16ps(6, 3, 0); }
    if (B >= 4) { auto [p, s] = tile_source(w0 + 48 * K, K, k, buf + 1536); _tile_loadd(1, p, s); _tile_dpbf16ps(7, 1, 0); }
  }
  _tile_stored(4, c, M * 4);
  if (B >= 2) _tile_stored(5, c + 16 * M, M * 4);
  if (B >= 3) _tile_stored(6, c + 32 * M, M * 4);
  if (B >= 4) _tile_stored(7, c + 48 * M, M * 4);
}

template <typename W>
static void amx_gemv(const Gemv<bf16, W>& g) {
  const int64_t M = g.M, K = g.K, blocks = g.N / 16;
  std::vector<uint32_t> xt(K / 2 * M);  // xt[k/2][m] = (x[m][k], x[m][k+1])
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(g.x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K / 2; ++k) xt[k * M + m] = x32[m * (K / 2) + k];
  at::parallel_for(0, blocks + 1, 1, [&](int64_t b0, int64_t b1) {
    if (b1 > blocks) g.avx_rows(blocks * 16, g.N), b1 = blocks;  // rows past the last whole block
    if (b0 >= b1) return;
    TileConfig cfg;
    cfg.rows[0] = 16, cfg.colsb[0] = M * 4;
    for (int t = 1; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    for (int t = 4; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = M * 4;
    _tile_loadconfig(&cfg);
    alignas(64) float c[64 * 16];
    alignas(64) bf16 buf[4 * 16 * 32];
    const __m512i row = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(M));
    for (int64_t b = b0; b < b1;) {
      const int nb = b1 - b >= 4 ? 4 : b1 - b >= 2 ? 2 : 1;
      const W* w0 = g.w + b * 16 * K;
      if (nb == 4) amx_blocks<W, 4>(w0, K, xt.data(), M, c, buf);
      else if (nb == 2) amx_blocks<W, 2>(w0, K, xt.data(), M, c, buf);
      else amx_blocks<W, 1>(w0, K, xt.data(), M, c, buf);
      for (int j = 0; j < nb; ++j) {  // c[16 rows n][M] -> y[m][n0, n0 + 16), scaled, plus bias
        const int64_t n0 = (b + j) * 16;
        const __m512 scale = g.scale ? load_bf16(g.scale + n0) : _mm512_set1_ps(1.0f);
        const __m512 bias = g.b ? load_bf16(g.b + n0) : _mm512_setzero_ps();
        for (int64_t m = 0; m < M; ++m) {
          const __m512 v = _mm512_fmadd_ps(_mm512_i32gather_ps(row, c + j * 16 * M + m, 4), scale, bias);
          store_bf16(g.y + m * g.N + n0, v);
        }
      }
      b += nb;
    }
    _tile_release();
  });
}
#endif

static bool uses_amx() {
#ifndef POCKETLM_NO_AMX
  return amx_ready();
#else
  return false;
#endif
}

// ---- the ops ------------------------------------------------------------------------------------------
template <typename X, typename W>
static at::Tensor run(const at::Tensor& x_, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& bias_, at::ScalarType xtype, at::ScalarType wtype) {
  TORCH_CHECK(x_.dim() == 2 && w.dim() == 2 && x_.size(1) == w.size(1), "gemv: x (M, K) and weight (N, K)");
  TORCH_CHECK(x_.scalar_type() == xtype && w.scalar_type() == wtype, "gemv: expected x ", xtype, ", weight ", wtype);
  TORCH_CHECK(w.is_contiguous() && w.size(1) % STEP<X> == 0, "gemv: contiguous weight, K % ", STEP<X>, " == 0");
  TORCH_CHECK(x_.size(0) <= 16, "gemv: at most 16 rows");
  const at::Tensor x = x_.contiguous();
  const std::optional<at::Tensor> bias = bias_.has_value() ? std::optional<at::Tensor>(bias_->contiguous()) : std::nullopt;
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == xtype && bias->numel() == w.size(0)), "gemv: bias");
  TORCH_CHECK(!scale.has_value() || (scale->is_contiguous() && scale->scalar_type() == at::kBFloat16 &&
                                     scale->numel() == w.size(0)), "gemv: scale, bf16 (N,)");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  const Gemv<X, W> g{static_cast<const X*>(x.data_ptr()), static_cast<const W*>(w.data_ptr()),
                     bias.has_value() ? static_cast<const X*>(bias->data_ptr()) : nullptr,
                     scale.has_value() ? static_cast<const bf16*>(scale->data_ptr()) : nullptr,
                     static_cast<X*>(y.data_ptr()), x.size(0), x.size(1), w.size(0)};
#ifndef POCKETLM_NO_AMX
  if constexpr (std::is_same_v<X, bf16>)
    if (g.M >= 2 && amx_ready()) return amx_gemv(g), y;  // one row: the AVX512 loop streams faster
#endif
  g.avx();
  return y;
}

static at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return run<bf16, bf16>(x, w, std::nullopt, bias, at::kBFloat16, at::kBFloat16);
}

static at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return run<float, float>(x, w, std::nullopt, bias, at::kFloat, at::kFloat);
}

static at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
  return run<bf16, int8_t>(x, w, scale, bias, at::kBFloat16, at::kChar);
}

TORCH_LIBRARY(pocketlm, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("gemv_uses_amx() -> bool", &uses_amx);
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("f32_gemv", &f32_gemv);
  m.impl("int8_gemv", &int8_gemv);
}
