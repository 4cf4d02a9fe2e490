// Element-wise kernels for bf16 training steps on CPUs with AVX512-BF16 (AMX or not); pocketlm/model/kernels.py
// builds them with train_attention.cpp, loads them and says which run.
//   gelu_fwd(x) -> y, gelu_bwd(dy, x) -> dx  GPT-2's tanh GELU
//   cross_entropy(logits, targets) -> (mean loss, d loss / d logits)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "train_common.h"
#include <cmath>
#include <limits>
#include <tuple>

// ---- GELU (tanh form) ----------------------------------------------------------------------------------
// gelu(x) = x sigmoid(z), z = c (x + a x^3): the tanh form rewritten, with a 12-instruction exp and a
// 14-bit reciprocal (outputs are bf16); Inductor's code takes a precise exp and a division per element.
constexpr float GELU_C = 1.5957691216057308f, GELU_A = 0.044715f;

static inline __m512 gelu_sigmoid(__m512 x, __m512 x2) {
  const __m512 z = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(GELU_C)), _mm512_fmadd_ps(x2, _mm512_set1_ps(GELU_A), _mm512_set1_ps(1.0f)));
  const __m512 zc = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-60.0f)), _mm512_set1_ps(60.0f));
  return _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), zc))));
}

template <typename F>
static void elementwise(int64_t n, F body) {  // body(i) for i in steps of 16; n % 16 == 0
  at::parallel_for(0, n / 16, 2048, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) body(b * 16);
  });
}

static at::Tensor gelu_fwd(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && x_.numel() % 16 == 0, "gelu kernel: bf16, numel % 16 == 0");
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  const bf16* xp = static_cast<const bf16*>(x.data_ptr());
  bf16* yp = static_cast<bf16*>(y.data_ptr());
  elementwise(x.numel(), [&](int64_t i) {
    const __m512 v = load_bf16(xp + i);
    store_bf16(yp + i, _mm512_mul_ps(v, gelu_sigmoid(v, _mm512_mul_ps(v, v))));
  });
  return y;
}

// d gelu / dx = s + x s (1 - s) c (1 + 3 a x^2), s = sigmoid(z)
static at::Tensor gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && dy_.scalar_type() == at::kBFloat16 && x_.sizes() == dy_.sizes() &&
              x_.numel() % 16 == 0, "gelu kernel: bf16 dy and x of one shape, numel % 16 == 0");
  const at::Tensor x = x_.contiguous(), dy = dy_.contiguous();
  at::Tensor dx = at::empty_like(x);
  const bf16 *xp = static_cast<const bf16*>(x.data_ptr()), *gp = static_cast<const bf16*>(dy.data_ptr());
  bf16* dp = static_cast<bf16*>(dx.data_ptr());
  elementwise(x.numel(), [&](int64_t i) {
    const __m512 v = load_bf16(xp + i), x2 = _mm512_mul_ps(v, v), sg = gelu_sigmoid(v, x2);
    const __m512 slope = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_fnmadd_ps(sg, sg, sg)),
                                       _mm512_fmadd_ps(x2, _mm512_set1_ps(3 * GELU_A * GELU_C), _mm512_set1_ps(GELU_C)));
    store_bf16(dp + i, _mm512_mul_ps(load_bf16(gp + i), _mm512_add_ps(sg, slope)));
  });
  return dx;
}

// ---- cross-entropy with its gradient --------------------------------------------------------------------
// One pass per row of bf16 logits gives the loss and d loss / d logits = (softmax - onehot) / n, so the
// backward is a scale: a (tokens x vocabulary) fp32 copy, a log-softmax and its backward saved.
static std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits_, const at::Tensor& targets_) {
  TORCH_CHECK(logits_.dim() == 2 && logits_.scalar_type() == at::kBFloat16 && logits_.size(1) % 16 == 0,
              "cross-entropy kernel: bf16 logits (N, V), V % 16 == 0");
  TORCH_CHECK(targets_.dim() == 1 && targets_.size(0) == logits_.size(0) && targets_.scalar_type() == at::kLong,
              "cross-entropy kernel: int64 targets (N,)");
  const at::Tensor logits = logits_.contiguous(), targets = targets_.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* tg = targets.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(tg[i] == -100 || (tg[i] >= 0 && tg[i] < V), "cross-entropy kernel: target ", tg[i], " at row ", i,
                " is outside [0, ", V, ") and not -100");
    count += tg[i] != -100;
  }
  at::Tensor grad = at::empty_like(logits), losses = at::zeros({N}, logits.options().dtype(at::kFloat));
  const bf16* lp = static_cast<const bf16*>(logits.data_ptr());
  bf16* gp = static_cast<bf16*>(grad.data_ptr());
  float* loss = losses.data_ptr<float>();
  const float inv_n = count ? 1.0f / count : 0.0f;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* x = lp + r * V;
      bf16* g = gp + r * V;
      if (tg[r] == -100) {
        for (int64_t c = 0; c < V; c += 16) store_bf16(g + c, _mm512_setzero_ps());
        continue;
      }
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t c = 0; c < V; c += 16) mx = _mm512_max_ps(mx, load_bf16(x + c));
      const float row_max = _mm512_reduce_max_ps(mx);
      const __m512 shift = _mm512_set1_ps(-row_max);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < V; c += 16) sum = _mm512_add_ps(sum, exp512(_mm512_add_ps(load_bf16(x + c), shift)));
      const float lse = row_max + std::log(_mm512_reduce_add_ps(sum));
      const __m512 sub = _mm512_set1_ps(-lse), scale = _mm512_set1_ps(inv_n);
      for (int64_t c = 0; c < V; c += 16)
        store_bf16(g + c, _mm512_mul_ps(exp512(_mm512_add_ps(load_bf16(x + c), sub)), scale));
      const float target_logit = float(c10::bit_cast<at::BFloat16>(x[tg[r]]));
      loss[r] = lse - target_logit;
      // the target's entry: softmax - 1, from the fp32 value rather than the rounded one
      g[tg[r]] = c10::bit_cast<bf16>(at::BFloat16((std::exp(target_logit - lse) - 1.0f) * inv_n));
    }
  });
  return {losses.sum() * inv_n, grad};
}

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x) -> Tensor");
  m.def("cross_entropy(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pocketlm, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
  m.impl("cross_entropy", &cross_entropy);
}
