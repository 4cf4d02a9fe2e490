// Per-row LoRA updates of a few tokens (the arithmetic row_lora.cpp describes), shared by row_lora.cpp
// (one projection per call, the per-op model) and decode_step.cpp (after each projection of its step):
//   y[t, cols of part p] += (A[s] x[t])[rows of part p] . Bt_p[s]     for s = slot[t], 0 <= s < slots
#pragma once
#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 -> fp32: the 16 bits are the top half of a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }

// y[0..w) += u[0..w): fp32, or bf16 rounded to nearest even as aten's add_ of an fp32 update rounds
inline void add_into(float* y, const float* u, int64_t w) {
  int64_t i = 0;
  for (; i + 16 <= w; i += 16) _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(u + i)));
  for (; i < w; ++i) y[i] += u[i];
}
inline void add_into(at::BFloat16* y, const float* u, int64_t w) {
  for (int64_t i = 0; i < w; ++i) y[i] = static_cast<at::BFloat16>(static_cast<float>(y[i]) + u[i]);
}

// (X, Y: fp32 or bf16 each; decode_step.cpp feeds the fp32 norm output into a bf16 y, as the model does)
template <typename X, typename Y>
void row_lora_apply(const X* x, Y* y, const int64_t* slots, const float* A, const std::vector<const float*>& Bt,
                    const std::vector<int64_t>& ranks, const std::vector<int64_t>& widths,
                    const std::vector<int64_t>& a_rows, const std::vector<int64_t>& y_cols, int64_t tokens,
                    int64_t n_in, int64_t n_out, int64_t R, int64_t S) {
  at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(R), u;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = slots[t];
      if (s < 0 || s >= S) continue;  // (a slot past this projection's stacks: no adapter touches it)
      const X* xt = x + t * n_in;
      const float* As = A + s * R * n_in;
      for (int64_t j = 0; j < R; ++j) {  // h = A[s] x[t]
        const float* a = As + j * n_in;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= n_in; k += 32) {
          acc0 = _mm512_fmadd_ps(load16(a + k), load16(xt + k), acc0);
          acc1 = _mm512_fmadd_ps(load16(a + k + 16), load16(xt + k + 16), acc1);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        for (; k < n_in; ++k) sum += to_f(a[k]) * to_f(xt[k]);
        h[j] = sum;
      }
      for (size_t p = 0; p < Bt.size(); ++p) {  // y[t, part p] += h[part p] . Bt_p[s]
        const int64_t r = ranks[p], w = widths[p];
        const float* B = Bt[p] + s * r * w;
        const float* hp = h.data() + a_rows[p];
        u.assign(w, 0.f);
        int64_t c = 0;
        for (; c + 16 <= w; c += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < r; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(hp[j]), load16(B + j * w + c), acc);
          _mm512_storeu_ps(u.data() + c, acc);
        }
        for (; c < w; ++c)
          for (int64_t j = 0; j < r; ++j) u[c] += hp[j] * to_f(B[j * w + c]);
        add_into(y + t * n_out + y_cols[p], u.data(), w);
      }
    }
  });
}

}  // namespace
