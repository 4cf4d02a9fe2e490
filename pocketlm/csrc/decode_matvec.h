// The matrix-vector loops of the C++ decode step (decode_step.cpp includes this file once):
// one weight matrix times a few bf16 activation rows (a decode step's), over the OpenMP threads torch uses.
//
// Weight formats per matrix (N outputs, K inputs; bf16 activations, fp32 sums):
//   0 bf16   w (N, K) bf16
//   1 int8   w (N, K) int8 times a bf16 scale per row
//   2 q4     4-bit codes in groups of 32 inputs: w = q * s + z (GGUF Q4_1's block: d and m, the layout
//            Int4Linear holds): codes (N, K/2) uint8 (Q4_LAYOUT), s and z (N, K/32) fp16, the file's
//            own d and m exactly (bf16 ones, aten's, lost 3 mantissa bits per group; same bytes).
//            y = sum_g s_g * (x_g . q_g) + z_g * sum(x_g): the second term's sums of x are made
//            once per step, so a group costs one vdpbf16ps and one FMA. Codes widen to bf16 as
//            128 + q (a byte beside 0x43: one unpack per 32, no table), and s_g * 128 * sum(x_g) is
//            taken off with the mins' term (fp32 sums of terms ~128x larger: error ~1e-5 relative,
//            far below the output's bf16 rounding).
// Q4_LAYOUT: per row, blocks of 64 bytes hold four groups a..d: the bytes of 16-byte lane L (0..3) are
//            [a[8L..8L+8), b[8L..8L+8)] in the low nibbles and [c[..], d[..]] in the high ones (what
//            vpunpckl/hbw read back in order); a last pair of groups (K % 128 == 64) is 32 bytes, byte j
//            holding group A's input j low and group B's high, widened by a table.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#include "common.h"

namespace {

constexpr int64_t AHEAD = 8;  // weight rows prefetched ahead of the four being summed
constexpr int64_t Q4_AHEAD = 16;  // q4 rows are half as long: twice as many ahead

inline float bf(bf16 v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline bf16 to_bf(float f) { return c10::bit_cast<bf16>(at::BFloat16(f)); }
inline float round_bf(float f) { return bf(to_bf(f)); }

inline __m512 load_bf16_rounded(__m512 v) {  // v rounded to bf16 (nearest even) and back
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

struct Matrix {
  int64_t fmt = 0, N = 0, K = 0;
  const void* w = nullptr;
  const bf16* s = nullptr;  // int8: per row, bf16; q4: per group, fp16 (the same 16 bits wide)
  const bf16* z = nullptr;  // q4: per group, fp16
  const bf16* bias = nullptr;
};

inline __m512 load_fp16_masked(const bf16* p, __mmask16 k) {  // up to 16 fp16 -> fp32, zeros past k
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// Per-format sums of four weight rows n..n+3 against R activation rows (x + r * K; q4: their group
// sums xs + r * K/32): out[r][i] for row r and weight row n + i, before the bias and the rounding. The
// weights are read (and widened) once for all R rows; more rows are more sums on the same widened
// registers, so a step's weight reads stay one per step however many rows it decodes.
template <int R>
void four(const Matrix& m, const bf16* x, const float* xs, int64_t n, bool prefetch, float out[R][4]) {
  const int64_t K = m.K;
  __m512 acc[4][R];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  if (m.fmt == 2) {
    const uint8_t* q = static_cast<const uint8_t*>(m.w) + n * (K / 2);
    const int64_t G = K / 32;
    const __m512i table = _mm512_set_epi16(  // bf16 of q for q = 31..0 (the top 16 unused)
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120,
        0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m512i low4 = _mm512_set1_epi8(0x0f), exp128 = _mm512_set1_epi8(0x43);
    const int64_t G4 = G / 4;
    if (prefetch)  // the scales and zeros of the rows the codes below fetch
      for (const bf16* t : {m.s, m.z}) _mm_prefetch((const char*)(t + (n + Q4_AHEAD) * G), _MM_HINT_T0);
    for (int64_t c = 0; c < G4; ++c) {  // four groups (64 bytes) a row at a time
      if (prefetch)
        for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(q + (Q4_AHEAD + i) * (K / 2) + c * 64), _MM_HINT_T0);
      for (int i = 0; i < 4; ++i) {
        const __m512i v = _mm512_loadu_si512(q + i * (K / 2) + c * 64);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        // a code byte next to 0x43 is the bf16 of 128 + q: 4 unpacks widen 128 codes (see Q4_LAYOUT)
        const __m512i w[4] = {_mm512_unpacklo_epi8(lo, exp128), _mm512_unpackhi_epi8(lo, exp128),
                              _mm512_unpacklo_epi8(hi, exp128), _mm512_unpackhi_epi8(hi, exp128)};
        // the four groups' fp16 scales (8 bytes) to fp32, each broadcast
        const __m512 s4 = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i*)(m.s + (n + i) * G + 4 * c))));
        const __m512 sc[4] = {_mm512_permutexvar_ps(_mm512_set1_epi32(0), s4), _mm512_permutexvar_ps(_mm512_set1_epi32(1), s4),
                              _mm512_permutexvar_ps(_mm512_set1_epi32(2), s4), _mm512_permutexvar_ps(_mm512_set1_epi32(3), s4)};
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < 4; ++j) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + c * 128 + j * 32);
            acc[i][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xv, (__m512bh)w[j]), sc[j], acc[i][r]);
          }
      }
    }
    for (int64_t c = 2 * G4; c < G / 2; ++c) {  // a last pair of groups (32 bytes), codes to q by table
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(q + i * (K / 2) + c * 32));
        const __m512i a = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(v, low)), table);
        const __m512i b = _mm512_permutexvar_epi16(
            _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low)), table);
        const __m512 s2 = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi32_si128(*(const int32_t*)(m.s + (n + i) * G + 2 * c))));
        const __m512 sa = _mm512_permutexvar_ps(_mm512_set1_epi32(0), s2), sb = _mm512_permutexvar_ps(_mm512_set1_epi32(1), s2);
        for (int r = 0; r < R; ++r) {
          const __m512bh xa = (__m512bh)_mm512_loadu_si512(x + r * K + c * 64);
          const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + r * K + c * 64 + 32);
          acc[i][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xa, (__m512bh)a), sa, acc[i][r]);
          acc[i][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xb, (__m512bh)b), sb, acc[i][r]);
        }
      }
    }
    for (int i = 0; i < 4; ++i) {  // + z . (sums of x per group) - 128 s . (those sums) over the unpacked groups
      const bf16 *z = m.z + (n + i) * G, *sg = m.s + (n + i) * G;
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 k = G - g >= 16 ? 0xffff : (__mmask16)((1u << (G - g)) - 1);
        const __mmask16 k4 = 4 * G4 - g >= 16 ? 0xffff : 4 * G4 <= g ? 0 : (__mmask16)((1u << (4 * G4 - g)) - 1);
        const __m512 zv = load_fp16_masked(z + g, k), sv = load_fp16_masked(sg + g, k4);
        for (int r = 0; r < R; ++r) {
          const __m512 xsv = _mm512_maskz_loadu_ps(k, xs + r * G + g);
          acc[i][r] = _mm512_fmadd_ps(zv, xsv, acc[i][r]);
          acc[i][r] = _mm512_fmadd_ps(sv, _mm512_mul_ps(xsv, _mm512_set1_ps(-128.0f)), acc[i][r]);
        }
      }
    }
  } else if (m.fmt == 1) {
    const int8_t* w = static_cast<const int8_t*>(m.w) + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      if (prefetch)
        for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (AHEAD + i) * K + k), _MM_HINT_T0);
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + i * K + k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
        const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  // exact: |q| <= 127
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)_mm512_loadu_si512(x + r * K + k), wv);
      }
    }
  } else {
    const bf16* w = static_cast<const bf16*>(m.w) + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      if (prefetch)
        for (int i = 0; i < 4; ++i) _mm_prefetch((const char*)(w + (AHEAD + i) * K + k), _MM_HINT_T0);
      for (int i = 0; i < 4; ++i) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i * K + k);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)_mm512_loadu_si512(x + r * K + k), wv);
      }
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < R; ++r) {
      out[r][i] = _mm512_reduce_add_ps(acc[i][r]);
      if (m.fmt == 1) out[r][i] *= bf(m.s[n + i]);
    }
}

constexpr int TILE = 4;  // activation rows per pass over a weight block: 4 x 4 fp32 sums stay in registers

// Weight rows n..n+3 against activation rows r0..r0+R-1, rounded into y (rows of N)
template <int R>
void tile(const Matrix& m, const bf16* x, const float* xs, int64_t r0, int64_t n, bool prefetch, bf16* y) {
  float v[R][4];
  four<R>(m, x + r0 * m.K, xs + r0 * (m.K / 32), n, prefetch, v);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) y[(r0 + r) * m.N + n + i] = to_bf(m.bias ? v[r][i] + bf(m.bias[n + i]) : v[r][i]);
}

// y (M rows of N bf16) = x (M rows of K bf16) . W^T (+ bias), over the OpenMP threads torch uses,
// split by weight rows (N % 4 == 0); each block of 4 weight rows is read once for every row of x.
void matmul(const Matrix& m, const bf16* x, int64_t M, bf16* y, std::vector<float>& xs) {
  const int64_t G = m.K / 32;
  if (m.fmt == 2) {
    xs.resize(M * G);
    for (int64_t g = 0; g < M * G; ++g) {
      const __m512 lo = load_bf16(x + g * 32), hi = load_bf16(x + g * 32 + 16);
      xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  }
  const float* sums = xs.data();
  at::parallel_for(0, m.N / 4, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool prefetch = b + AHEAD / 4 < b1;
      int64_t r = 0;
      for (; r + TILE <= M; r += TILE) tile<TILE>(m, x, sums, r, b * 4, prefetch && r == 0, y);
      switch (M - r) {  // (the rows left over)
        case 3: tile<3>(m, x, sums, r, b * 4, prefetch && r == 0, y); break;
        case 2: tile<2>(m, x, sums, r, b * 4, prefetch && r == 0, y); break;
        case 1: tile<1>(m, x, sums, r, b * 4, prefetch && r == 0, y); break;
      }
    }
  });
}

}  // namespace
