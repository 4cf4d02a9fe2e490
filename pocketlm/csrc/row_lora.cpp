// Per-row LoRA updates for a decode step's few tokens (pocketlm/infer/adapters.py, RowLoRA):
//   y[t, cols of part p] += (A[s] x[t])[rows of part p] . Bt_p[s]     for s = slot[t] >= 0
// in one call per projection. aten's batched matmuls read a rank-8 B at about half the speed a plain
// read of it runs at (K = 8 is too short for its kernels) and each part costs a bmm and an add; here
// each token's h = A[s] x stays in registers and every B row is read once, its product added into y
// (bf16 or fp32) directly. Prefill (many tokens of one slot) stays on the batched matmuls.
#include <immintrin.h>
#include <torch/library.h>
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

template <typename T>
void apply(const T* x, T* y, const int64_t* slots, const float* A, const std::vector<const float*>& Bt,
           const std::vector<int64_t>& ranks, const std::vector<int64_t>& widths, const std::vector<int64_t>& a_rows,
           const std::vector<int64_t>& y_cols, int64_t tokens, int64_t n_in, int64_t n_out, int64_t R) {
  at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(R), u;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      const T* xt = x + t * n_in;
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

void row_lora_(const at::Tensor& x, const at::Tensor& y, const at::Tensor& slots, const at::Tensor& A,
               at::TensorList Bt, at::IntArrayRef a_rows, at::IntArrayRef y_cols) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.is_contiguous() && y.is_contiguous(),
              "row_lora_: x (T, in) and y (T, out), contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "row_lora_: x and y both fp32 or both bf16");
  TORCH_CHECK(A.dim() == 3 && A.scalar_type() == at::kFloat && A.is_contiguous() && A.size(2) == x.size(1),
              "row_lora_: A (slots, R, in) fp32, contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == x.size(0), "row_lora_: slots (T,) int64");
  TORCH_CHECK(Bt.size() == a_rows.size() && Bt.size() == y_cols.size(), "row_lora_: one row and column offset per B");
  const at::Tensor sl = slots.contiguous();
  const int64_t S = A.size(0), R = A.size(1);
  for (int64_t i = 0; i < sl.numel(); ++i) TORCH_CHECK(sl.data_ptr<int64_t>()[i] < S, "row_lora_: slot out of range");
  std::vector<const float*> Bp;
  std::vector<int64_t> ranks, widths, rows(a_rows.begin(), a_rows.end()), cols(y_cols.begin(), y_cols.end());
  for (size_t p = 0; p < Bt.size(); ++p) {
    const at::Tensor& b = Bt[p];
    TORCH_CHECK(b.dim() == 3 && b.scalar_type() == at::kFloat && b.is_contiguous() && b.size(0) == S &&
                rows[p] + b.size(1) <= R && cols[p] + b.size(2) <= y.size(1), "row_lora_: Bt[", p, "] (slots, r, w)");
    Bp.push_back(b.data_ptr<float>());
    ranks.push_back(b.size(1));
    widths.push_back(b.size(2));
  }
  if (x.scalar_type() == at::kFloat)
    apply<float>(x.data_ptr<float>(), y.data_ptr<float>(), sl.data_ptr<int64_t>(), A.data_ptr<float>(), Bp, ranks,
                 widths, rows, cols, x.size(0), x.size(1), y.size(1), R);
  else
    apply<at::BFloat16>(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), sl.data_ptr<int64_t>(),
                        A.data_ptr<float>(), Bp, ranks, widths, rows, cols, x.size(0), x.size(1), y.size(1), R);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("row_lora_(Tensor x, Tensor(a!) y, Tensor slots, Tensor A, Tensor[] Bt, int[] a_rows, int[] y_cols) -> ()",
        &row_lora_);
}
