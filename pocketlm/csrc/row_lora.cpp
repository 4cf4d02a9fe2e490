// Per-row LoRA updates for a decode step's few tokens (pocketlm/infer/adapters.py, RowLoRA):
//   y[t, cols of part p] += (A[s] x[t])[rows of part p] . Bt_p[s]     for s = slot[t] >= 0
// in one call per projection. aten's batched matmuls read a rank-8 B at about half the speed a plain
// read of it runs at (K = 8 is too short for its kernels) and each part costs a bmm and an add; here
// each token's h = A[s] x stays in registers and every B row is read once, its product added into y
// (bf16 or fp32) directly. Prefill (many tokens of one slot) stays on the batched matmuls.
#include <torch/library.h>
#include "row_lora.h"

namespace {

void row_lora_(const at::Tensor& x, const at::Tensor& y, const at::Tensor& slots, const at::Tensor& A,
               at::TensorList Bt, at::IntArrayRef a_rows, at::IntArrayRef y_cols) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.is_contiguous() && y.is_contiguous(),
              "row_lora_: x (T, in) and y (T, out), contiguous");
  const auto fp = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; };
  TORCH_CHECK(fp(x) && fp(y), "row_lora_: x and y fp32 or bf16 each");
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
  // (the engine's bf16 model hands qkv and gate/up the norm's fp32 output, the others bf16)
  auto run = [&](auto* xp, auto* yp) {
    row_lora_apply(xp, yp, sl.data_ptr<int64_t>(), A.data_ptr<float>(), Bp, ranks, widths, rows, cols, x.size(0), x.size(1),
                   y.size(1), R, S);
  };
  const bool x32 = x.scalar_type() == at::kFloat, y32 = y.scalar_type() == at::kFloat;
  if (x32 && y32) run(x.data_ptr<float>(), y.data_ptr<float>());
  else if (x32) run(x.data_ptr<float>(), y.data_ptr<at::BFloat16>());
  else if (y32) run(x.data_ptr<at::BFloat16>(), y.data_ptr<float>());
  else run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("row_lora_(Tensor x, Tensor(a!) y, Tensor slots, Tensor A, Tensor[] Bt, int[] a_rows, int[] y_cols) -> ()",
        &row_lora_);
}
