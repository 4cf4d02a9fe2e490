// Causal attention for bf16 training steps, on AMX tiles or on AVX512-BF16 alone (pocketlm/model/kernels.py
// builds it, asks the CPU and passes the choice as `amx`):
//   attn_fwd(q, k, v, amx) -> (out, lse)     q, k, v (B, H, T, D), T and D multiples of 32
//   attn_bwd(dout, q, k, v, out, lse, amx) -> (dq, dk, dv)
//   amx_granted() -> bool                    requests the tile state; only asked on CPUs that have AMX
// Attention takes one (batch, head) at a time per thread. Its whole score rows fit in cache, so each
// 32-query block takes a plain softmax over all the keys it sees (no running maximum), and the backward
// walks 32-key blocks, recomputing the transposed probabilities from the saved log-sum-exp. Every
// product is a 32 x 32 block in bf16 with fp32 sums, from operands packed in the tile unit's pair layout;
// the forward and backward are templates over what computes that block (AmxBlocks, Avx512Blocks).
// With -DPOCKETLM_NO_AMX (a compiler without AMX intrinsics) only the AVX512-BF16 half is built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "train_common.h"
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifndef POCKETLM_NO_AMX
static void load_tiles() {  // every tile 16 rows x 64 bytes: A 16 x 32 bf16, B 16 pairs x 16, C 16 x 16 fp32
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// C (32 x 32 fp32, row stride ldc) = A (32 x K bf16, row stride lda) . B, where B (K x 32) lies as K/2
// rows of 32 bf16 pairs (B[2i][n], B[2i+1][n]) with row stride ldb pairs: the tile unit's layout.
static inline void block32(const bf16* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t K, float* C,
                           int64_t ldc) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(0, A + k, lda * 2);
    _tile_loadd(1, A + 16 * lda + k, lda * 2);
    _tile_loadd(2, B + k / 2 * ldb, ldb * 4);
    _tile_loadd(3, B + k / 2 * ldb + 16, ldb * 4);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  _tile_stored(4, C, ldc * 4);
  _tile_stored(5, C + 16, ldc * 4);
  _tile_stored(6, C + 16 * ldc, ldc * 4);
  _tile_stored(7, C + 16 * ldc + 16, ldc * 4);
}

struct AmxBlocks {  // each thread configures the tiles before its first block and releases them after its last
  static void begin() { load_tiles(); }
  static void end() { _tile_release(); }
  static void block(const bf16* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t K, float* C, int64_t ldc) {
    block32(A, lda, B, ldb, K, C, ldc);
  }
};
#endif

// The same block on AVX512-BF16 alone. vdpbf16ps adds, in lane n, A[m][2i] B[2i][n] + A[m][2i+1] B[2i+1][n]
// when A's pair (m, i) is broadcast against B's pair row i, so the tile layout serves unchanged. R rows of
// C at a time: 2R accumulators, B's two vectors loaded once per pair row for all R.
template <int R>
static inline void rows_avx512(const bf16* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t K, float* C,
                               int64_t ldc) {
  __m512 acc[R][2];  // in registers only if every loop over r unrolls
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K / 2; ++i) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + i * ldb), b1 = (__m512bh)_mm512_loadu_si512(B + i * ldb + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * i, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);  // last operand: it can stay a memory broadcast
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b0, a);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b1, a);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(C + r * ldc, acc[r][0]);
    _mm512_storeu_ps(C + r * ldc + 16, acc[r][1]);
  }
}

struct Avx512Blocks {
  static void begin() {}
  static void end() {}
  static void block(const bf16* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t K, float* C, int64_t ldc) {
    for (int m = 0; m < 32; m += 8) rows_avx512<8>(A + m * lda, lda, B, ldb, K, C + m * ldc, ldc);
  }
};

// ---- packing: O(T D) per head against O(T^2 D) of products ---------------------------------------------
// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit elements (row strides in elements): 32-bit, 64-bit
// and 128-bit interleaves, 64 shuffles for 256 elements.
static inline void transpose16(const uint32_t* src, int64_t ss, uint32_t* dst, int64_t ds) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ss);
  for (int i = 0; i < 16; i += 2) {  // lane L of t[i]: (r[i][4L], r[i+1][4L], r[i][4L+1], r[i+1][4L+1]); t[i+1]: +2
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // lane L of r[4g + m]: rows 4g..4g+3 of column 4L + m
    const __m512i* u = t + 4 * g;
    r[4 * g] = _mm512_unpacklo_epi64(u[0], u[2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(u[0], u[2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(u[1], u[3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(u[1], u[3]);
  }
  for (int m = 0; m < 4; ++m) {  // gather lane L of the four groups: column 4L + m, all 16 rows
    const __m512i x0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44), x3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    _mm512_storeu_si512(dst + m * ds, _mm512_shuffle_i32x4(x0, x2, 0x88));
    _mm512_storeu_si512(dst + (4 + m) * ds, _mm512_shuffle_i32x4(x0, x2, 0xDD));
    _mm512_storeu_si512(dst + (8 + m) * ds, _mm512_shuffle_i32x4(x1, x3, 0x88));
    _mm512_storeu_si512(dst + (12 + m) * ds, _mm512_shuffle_i32x4(x1, x3, 0xDD));
  }
}

// x (T x D bf16, row stride st) as the right side of x^T products: out[p][t] = (x[t][2p], x[t][2p+1]).
static void pack_transposed(const bf16* x, int64_t st, int64_t T, int64_t D, uint32_t* out) {
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  for (int64_t t = 0; t < T; t += 16)
    for (int64_t p = 0; p < D / 2; p += 16) transpose16(x32 + t * st / 2 + p, st / 2, out + p * T + t, T);
}

// x (T x D) as the right side of products over t: out[i][d] = (x[2i][d], x[2i+1][d]).
static void pack_pairs(const bf16* x, int64_t st, int64_t T, int64_t D, uint32_t* out) {
  for (int64_t i = 0; i < T / 2; ++i) {
    const bf16 *a = x + 2 * i * st, *b = a + st;
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = a[d] | uint32_t(b[d]) << 16;
  }
}

// The pairs of pack_transposed split back into rows: out[d][t] = x[t][d], bf16 (D x T).
static void unpair(const uint32_t* pairs, int64_t T, int64_t D, bf16* out) {
  for (int64_t p = 0; p < D / 2; ++p)
    for (int64_t t = 0; t < T; t += 16) {
      const __m512i v = _mm512_loadu_si512(pairs + p * T + t);
      _mm256_storeu_si256((__m256i*)(out + 2 * p * T + t), _mm512_cvtepi32_epi16(v));
      _mm256_storeu_si256((__m256i*)(out + (2 * p + 1) * T + t), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
    }
}

static inline __mmask16 first_lanes(int64_t n) {  // lanes 0..n-1 of 16 (n clamped to 0..16)
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1;
}

// Row r of a block of 32 (32 x D fp32, row stride D) -> bf16 at dst.
static void store_rows(const float* src, int64_t D, bf16* dst, int64_t st) {
  for (int r = 0; r < 32; ++r)
    for (int64_t d = 0; d < D; d += 16) store_bf16(dst + r * st + d, _mm512_loadu_ps(src + r * D + d));
}

struct Head {  // one (batch, head) of a (B, H, T, D) tensor: row t starts at p + t * st
  bf16* p;
  int64_t st;
};
static Head head(const at::Tensor& x, int64_t b, int64_t h) {
  return {static_cast<bf16*>(x.data_ptr()) + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

// x as the kernels read it: bf16 (B, H, T, D) like q, each row contiguous and 4-byte aligned
static at::Tensor rows(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.dim() == 4 && x.sizes() == q.sizes() && x.scalar_type() == at::kBFloat16,
              "attention kernel: ", name, " must be bf16 (B, H, T, D) like q");
  return x.stride(3) == 1 && x.stride(2) % 2 == 0 ? x : x.contiguous();
}

static at::Tensor like_out(const at::Tensor& q) {  // (B, H, T, D) laid out as (B, T, H, D), as o_proj reads it
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// ---- forward --------------------------------------------------------------------------------------------
template <class Blocks>
static std::tuple<at::Tensor, at::Tensor> attn_fwd_on(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
  const at::Tensor q = rows(q_, "q", q_), k = rows(k_, "k", q_), v = rows(v_, "v", q_);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(T % 32 == 0 && D % 32 == 0, "attention kernel: T and D must be multiples of 32");
  at::Tensor out = like_out(q), lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    Blocks::begin();
    std::vector<uint32_t> kt(D / 2 * T), vp(T / 2 * D);
    std::vector<float> s(32 * T), o(32 * D);
    std::vector<bf16> pr(32 * T);
    for (int64_t i = i0; i < i1; ++i) {
      const Head qh = head(q, i / H, i % H), kh = head(k, i / H, i % H), vh = head(v, i / H, i % H);
      const Head oh = head(out, i / H, i % H);
      float* lrow = lse.data_ptr<float>() + i * T;
      pack_transposed(kh.p, kh.st, T, D, kt.data());
      pack_pairs(vh.p, vh.st, T, D, vp.data());
      for (int64_t q0 = 0; q0 < T; q0 += 32) {
        const int64_t L = q0 + 32;  // keys this block sees
        for (int64_t n = 0; n < L; n += 32) Blocks::block(qh.p + q0 * qh.st, qh.st, kt.data() + n, T, D, s.data() + n, T);
        for (int r = 0; r < 32; ++r) {  // softmax over keys 0..t of query t = q0 + r
          float* sr = s.data() + r * T;
          bf16* pr_r = pr.data() + r * T;
          const int64_t valid = q0 + r + 1;
          __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          for (int64_t c = 0; c < valid; c += 16) {
            const __mmask16 m = first_lanes(valid - c);
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, m, sr + c));
          }
          const float row_max = _mm512_reduce_max_ps(mx);
          const __m512 shift = _mm512_set1_ps(-row_max * scale), sc = _mm512_set1_ps(scale);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t c = 0; c < valid; c += 16) {
            const __mmask16 m = first_lanes(valid - c);
            const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_fmadd_ps(_mm512_loadu_ps(sr + c), sc, shift)));
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(sr + c, e);
          }
          const float total = _mm512_reduce_add_ps(sum);
          lrow[q0 + r] = row_max * scale + std::log(total);
          const __m512 inv = _mm512_set1_ps(1.0f / total);
          int64_t c = 0;
          for (; c < valid; c += 16) {
            const __mmask16 m = first_lanes(valid - c);
            store_bf16(pr_r + c, _mm512_maskz_mul_ps(m, _mm512_loadu_ps(sr + c), inv));
          }
          for (; c < L; c += 16) store_bf16(pr_r + c, _mm512_setzero_ps());
        }
        for (int64_t d = 0; d < D; d += 32) Blocks::block(pr.data(), T, vp.data() + d, D, L, o.data() + d, D);
        store_rows(o.data(), D, oh.p + q0 * oh.st, oh.st);
      }
    }
    Blocks::end();
  });
  return {out, lse};
}

// ---- backward -------------------------------------------------------------------------------------------
template <class Blocks>
static std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_on(const at::Tensor& dout_, const at::Tensor& q_,
                                                                  const at::Tensor& k_, const at::Tensor& v_,
                                                                  const at::Tensor& out_, const at::Tensor& lse_) {
  const at::Tensor q = rows(q_, "q", q_), k = rows(k_, "k", q_), v = rows(v_, "v", q_);
  const at::Tensor out = rows(out_, "out", q_), dout = rows(dout_, "dout", q_), lse = lse_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(T % 32 == 0 && D % 32 == 0, "attention kernel: T and D must be multiples of 32");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == B * H * T, "attention kernel: lse must be fp32 (B, H, T)");
  at::Tensor dq = like_out(q), dk = like_out(q), dv = like_out(q);
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    Blocks::begin();
    std::vector<uint32_t> qt(D / 2 * T), dot(D / 2 * T), kpt(D / 2 * T), dop(T / 2 * D), qp(T / 2 * D), dsp(T / 2 * T);
    std::vector<bf16> kt(D * T), pt(32 * T), dst(32 * T);
    std::vector<float> s(32 * T), dp(32 * T), delta(T), blk(32 * D), dqt(D * T), dqr(T * D);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const Head qh = head(q, b, h), kh = head(k, b, h), vh = head(v, b, h), oh = head(out, b, h), gh = head(dout, b, h);
      const Head dqh = head(dq, b, h), dkh = head(dk, b, h), dvh = head(dv, b, h);
      const float* lrow = lse.data_ptr<float>() + i * T;
      for (int64_t t = 0; t < T; ++t) {  // delta[t] = dout[t] . out[t]
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
          acc = _mm512_fmadd_ps(load_bf16(gh.p + t * gh.st + d), load_bf16(oh.p + t * oh.st + d), acc);
        delta[t] = _mm512_reduce_add_ps(acc);
      }
      pack_transposed(qh.p, qh.st, T, D, qt.data());
      pack_transposed(gh.p, gh.st, T, D, dot.data());
      pack_transposed(kh.p, kh.st, T, D, kpt.data());
      unpair(kpt.data(), T, D, kt.data());
      pack_pairs(gh.p, gh.st, T, D, dop.data());
      pack_pairs(qh.p, qh.st, T, D, qp.data());
      for (int64_t j0 = 0; j0 < T; j0 += 32) {  // keys j0..j0+32 against queries t = j0 + c, c < L
        const int64_t L = T - j0;
        for (int64_t n = 0; n < L; n += 32) {
          Blocks::block(kh.p + j0 * kh.st, kh.st, qt.data() + j0 + n, T, D, s.data() + n, T);   // S^T = K Q^T
          Blocks::block(vh.p + j0 * vh.st, vh.st, dot.data() + j0 + n, T, D, dp.data() + n, T);  // dP^T = V dO^T
        }
        // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta) scale; key j = j0 + r sees queries t >= j
        auto grads = [&](int r, int64_t c, __m512& p, __m512& ds) {
          const int64_t before = r - c, t = j0 + c;  // lanes below `before` are queries ahead of key j
          const __mmask16 causal = __mmask16(~first_lanes(before));
          p = _mm512_maskz_mov_ps(causal, exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s.data() + r * T + c), sc,
                                                                 _mm512_loadu_ps(lrow + t))));
          ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp.data() + r * T + c),
                                                            _mm512_loadu_ps(delta.data() + t))), sc);
          store_bf16(pt.data() + r * T + c, p);
          store_bf16(dst.data() + r * T + c, ds);
        };
        for (int r = 0; r < 32; r += 2)
          for (int64_t c = 0; c < L; c += 16) {
            __m512 p0, ds0, p1, ds1;
            grads(r, c, p0, ds0);
            grads(r + 1, c, p1, ds1);
            // dS^T as pairs over keys, the right side of dQ^T = K^T dS^T below
            const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(ds0));
            const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(ds1));
            _mm512_storeu_si512(dsp.data() + (j0 + r) / 2 * T + j0 + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
          }
        for (int64_t d = 0; d < D; d += 32) Blocks::block(pt.data(), T, dop.data() + j0 / 2 * D + d, D, L, blk.data() + d, D);
        store_rows(blk.data(), D, dvh.p + j0 * dvh.st, dvh.st);  // dV = P^T dO
        for (int64_t d = 0; d < D; d += 32) Blocks::block(dst.data(), T, qp.data() + j0 / 2 * D + d, D, L, blk.data() + d, D);
        store_rows(blk.data(), D, dkh.p + j0 * dkh.st, dkh.st);  // dK = dS^T Q
      }
      for (int64_t t0 = 0; t0 < T; t0 += 32)  // queries t0..t0+32 see keys 0..t0+32
        for (int64_t d = 0; d < D; d += 32) Blocks::block(kt.data() + d * T, T, dsp.data() + t0, T, t0 + 32, dqt.data() + d * T + t0, T);
      uint32_t *from = reinterpret_cast<uint32_t*>(dqt.data()), *to = reinterpret_cast<uint32_t*>(dqr.data());
      for (int64_t d = 0; d < D; d += 16)
        for (int64_t t = 0; t < T; t += 16) transpose16(from + d * T + t, T, to + t * D + d, D);
      for (int64_t t = 0; t < T; t += 32) store_rows(dqr.data() + t * D, D, dqh.p + t * dqh.st, dqh.st);
    }
    Blocks::end();
  });
  return {dq, dk, dv};
}

// ---- the choice of block ------------------------------------------------------------------------------
static bool amx_granted() {
#ifndef POCKETLM_NO_AMX
  return amx_ready();
#else
  return false;
#endif
}

static void check_amx(bool amx) {  // the AMX half runs only where asked for, and only with the tile state
#ifndef POCKETLM_NO_AMX
  TORCH_CHECK(!amx || amx_ready(), "attention kernel: no AMX tile state");
#else
  TORCH_CHECK(!amx, "attention kernel: built without AMX (POCKETLM_NO_AMX)");
#endif
}

static std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool amx) {
  check_amx(amx);
#ifndef POCKETLM_NO_AMX
  if (amx) return attn_fwd_on<AmxBlocks>(q, k, v);
#endif
  return attn_fwd_on<Avx512Blocks>(q, k, v);
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse, bool amx) {
  check_amx(amx);
#ifndef POCKETLM_NO_AMX
  if (amx) return attn_bwd_on<AmxBlocks>(dout, q, k, v, out, lse);
#endif
  return attn_bwd_on<Avx512Blocks>(dout, q, k, v, out, lse);
}

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, bool amx) -> (Tensor, Tensor)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool amx) -> (Tensor, Tensor, Tensor)");
  m.def("amx_granted() -> bool", &amx_granted);
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("attn_fwd", &attn_fwd);
  m.impl("attn_bwd", &attn_bwd);
}
