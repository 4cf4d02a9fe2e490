// One query head's attention for the C++ decode step (decode_step.cpp includes this file once).
//
// out (Dh bf16) = softmax(q k^T / sqrt(Dh)) v over positions 0..T-1 of one kv head (rows sp apart).
// The order of operations is aten's flash attention's for one query (what the eager step's SDPA
// runs): keys in blocks of FLASH_BLOCK with a running max, exp_u20 over whole vectors and std::exp
// over the rest, the weights for v rounded to bf16, the sums in fp32, the output scaled by 1 / sum.
// The two agree to the bit up to 15 keys; beyond, aten's matrix products sum in another order (an
// ulp here and there). The output accumulates in registers where the head size is known at compile
// time (C = Dh / 16: 2, 4 or 8), so a key's v row costs C FMAs, not C loads and stores of the sums.
#pragma once
#include <cmath>
#include "decode_matvec.h"

namespace {

constexpr int64_t FLASH_BLOCK = 512;  // keys per block of aten's flash attention at one query
constexpr int MAX_CHUNKS = 16;        // head_dim up to 256 (16 vectors of 16 fp32)

template <int C>  // C: Dh / 16 when fixed at compile time, 0 where only Dh says
void attend_head(const bf16* q, const bf16* k, const bf16* v, int64_t sp, int64_t T, int64_t Dh, float* s, bf16* out) {
  using Vec = at::vec::Vectorized<float>;
  const int nc = C ? C : int(Dh / 16);
  const float scale = 1.0f / std::sqrt(float(Dh));
  __m512 o[C ? C : MAX_CHUNKS];
  float mx = -INFINITY, sum = 0;
  for (int64_t n0 = 0; n0 < T; n0 += FLASH_BLOCK) {
    const int64_t nb = std::min(FLASH_BLOCK, T - n0);
    float bmax = -INFINITY;
    for (int64_t t = 0; t < nb; ++t) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < nc; c += 2)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c * 16), (__m512bh)_mm512_loadu_si512(k + (n0 + t) * sp + c * 16));
      s[t] = _mm512_reduce_add_ps(acc) * scale;
      bmax = std::max(bmax, s[t]);
    }
    const float m = std::max(mx, bmax);
    Vec vsum(0.0f);
    int64_t t = 0;
    for (; t + Vec::size() <= nb; t += Vec::size()) {
      const Vec e = (Vec::loadu(s + t) - Vec(m)).exp_u20();
      vsum += e;
      _mm512_storeu_ps(s + t, load_bf16_rounded(e));
    }
    float bsum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    for (; t < nb; ++t) {
      const float e = std::exp(s[t] - m);
      bsum += e;
      s[t] = round_bf(e);
    }
    const float rescale = std::exp(mx - m);
    sum = bsum + rescale * sum;
    mx = m;
    for (int c = 0; c < nc; ++c) o[c] = n0 == 0 ? _mm512_setzero_ps() : _mm512_mul_ps(o[c], _mm512_set1_ps(rescale));
    for (int64_t t = 0; t < nb; ++t) {
      const __m512 p = _mm512_set1_ps(s[t]);
      const bf16* vt = v + (n0 + t) * sp;
      for (int c = 0; c < nc; ++c) o[c] = _mm512_fmadd_ps(p, load_bf16(vt + c * 16), o[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int c = 0; c < nc; ++c) store_bf16(out + c * 16, _mm512_mul_ps(o[c], inv));
}

}  // namespace
