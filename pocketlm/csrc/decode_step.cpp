// One decode step of a llama-arch model in C++, for one row or many (one token each, each row at its
// own position): every layer (RMSNorm, fused qkv, RoPE, the KV-cache append, GQA attention over each
// row's past, o-proj, RMSNorm, fused gate/up, SiLU * up, down) and the final norm, without a Python
// call or a dispatcher round trip per op, each weight read once for all rows. Built and driven by
// pocketlm/infer/cstep.py, which says why (the eager step is bound by per-op overhead).
//
// Numerics follow the engine's eager step (pocketlm/infer/fused.py): the residual stream and norms
// in fp32, every matrix input rounded to bf16, matrix outputs rounded to bf16, RoPE in fp32 rounded
// to bf16, the KV cache in bf16, attention summed in fp32, SiLU and the product each rounded to bf16.
//
// Weight formats and their matrix loops: decode_matvec.h; one head's attention: decode_attention.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>
#include "common.h"
// aten's vector types at their AVX512 width (this file is built for AVX512 CPUs only): attention and
// SiLU use aten's own exp functions so that their results are the eager step's
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "decode_attention.h"
#include "decode_matvec.h"
#include "row_lora.h"

namespace {

void rms_norm(const float* x, const float* w, int64_t D, double eps, bf16* out, float* out32) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / D) + float(eps));
  for (int64_t i = 0; i < D; ++i) {
    const float v = x[i] * r * w[i];
    if (out) out[i] = to_bf(v);
    if (out32) out32[i] = v;
  }
}

// In place on bf16 heads (H of D each) at one position: HF's rotate-half layout, fp32, rounded.
void rope(bf16* h, int64_t H, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  std::vector<float> t(D);
  for (int64_t j = 0; j < H; ++j, h += D) {
    for (int64_t i = 0; i < D; ++i) t[i] = bf(h[i]);
    for (int64_t i = 0; i < D; ++i) {
      const float rot = i < half ? -t[i + half] : t[i - half];
      h[i] = to_bf(t[i] * cos[i] + rot * sin[i]);
    }
  }
}

class DecodeStep : public torch::CustomClassHolder {
 public:
  // tensors: per layer [attn_norm, then qkv, o, up (gate rows then up rows), down as 4 each (w, s, z,
  // bias; empty where unused), mlp_norm], then final norm, rope cos, rope sin.
  // ints: n_layer, n_head, n_kv_head, head_dim, n_embd, intermediate, then the 4 formats per layer.
  DecodeStep(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, double eps)
      : held_(std::move(tensors)), eps_(eps) {
    TORCH_CHECK(ints.size() >= 6, "DecodeStep: ints needs the 6 sizes first");
    L_ = ints[0], H_ = ints[1], KVH_ = ints[2], Dh_ = ints[3], D_ = ints[4], I_ = ints[5];
    TORCH_CHECK(int64_t(ints.size()) == 6 + 4 * L_ && int64_t(held_.size()) == L_ * 18 + 3,
                "DecodeStep: expected ", 6 + 4 * L_, " ints and ", L_ * 18 + 3, " tensors");
    TORCH_CHECK(Dh_ % 32 == 0 && Dh_ <= 16 * MAX_CHUNKS && H_ % KVH_ == 0, "DecodeStep: head_dim % 32 == 0, <= 256, and whole GQA groups");
    const int64_t shapes[4][2] = {{(H_ + 2 * KVH_) * Dh_, D_}, {D_, H_ * Dh_}, {2 * I_, D_}, {D_, I_}};
    for (int64_t l = 0; l < L_; ++l) {
      const at::Tensor* t = held_.data() + l * 18;
      Layer layer;
      layer.attn_norm = f32(t[0], D_, "attn_norm");
      for (int j = 0; j < 4; ++j) layer.m[j] = matrix(t + 1 + 4 * j, ints[6 + 4 * l + j], shapes[j][0], shapes[j][1]);
      layer.mlp_norm = f32(t[17], D_, "mlp_norm");
      layers_.push_back(layer);
    }
    norm_ = f32(held_[L_ * 18], D_, "norm");
    const at::Tensor &c = held_[L_ * 18 + 1], &s = held_[L_ * 18 + 2];
    TORCH_CHECK(c.dim() == 2 && c.size(1) == Dh_ && c.sizes() == s.sizes() && c.is_contiguous() && s.is_contiguous() &&
                c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, "DecodeStep: rope tables (T, head_dim) fp32");
    positions_ = c.size(0), cos_ = c.data_ptr<float>(), sin_ = s.data_ptr<float>();
  }

  // x: (M, n_embd) fp32, each row's token embedding, overwritten with the final norm's output. k, v:
  // the KV store's rows for these M sequences, (n_layer, M, n_kv_head, max_len, head_dim) bf16;
  // positions (M,) int64: row r writes its position positions[r] and attends over 0..positions[r].
  // Every weight matrix is read once per call for all M rows (decode_matvec.h's matmul).
  // slots: (M,) int64, each row's adapter slot (-1: none) in the stacks set_lora gave, or empty (no
  // adapters): each projection's per-row low-rank update is added right after its matrix.
  at::Tensor run(at::Tensor x, at::Tensor k, at::Tensor v, at::Tensor positions, at::Tensor slots) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) == D_, "DecodeStep.run: x (rows, n_embd) fp32");
    const int64_t M = x.size(0);
    TORCH_CHECK(M >= 1 && positions.is_contiguous() && positions.scalar_type() == at::kLong && positions.numel() == M,
                "DecodeStep.run: positions (rows,) int64");
    for (const at::Tensor* c : {&k, &v})
      TORCH_CHECK(c->dim() == 5 && c->size(0) == L_ && c->size(1) == M && c->size(2) == KVH_ && c->size(4) == Dh_ &&
                  c->stride(4) == 1 && c->scalar_type() == at::kBFloat16, "DecodeStep.run: k/v (n_layer, rows, kv heads, len, head_dim) bf16");
    TORCH_CHECK(v.strides() == k.strides(), "DecodeStep.run: k and v laid out alike");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* rs = nullptr;
    if (slots.numel()) {
      TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == at::kLong && slots.numel() == M, "DecodeStep.run: slots (rows,) int64");
      TORCH_CHECK(!lora_.empty(), "DecodeStep.run: slots given but set_lora was never called");
      rs = slots.data_ptr<int64_t>();
    }
    // y (M, N) += each row's update of layer l's matrix j from its input x (M, K): bf16 (attention
    // output, SiLU * up), or for qkv and gate/up the norm's fp32 output (the per-op model hands its
    // adapters the unrounded norm; only the base matrix reads it rounded to bf16)
    auto adapt = [&](int64_t l, int j, const auto* in, bf16* y) {
      if (!rs || !lora_[l * 4 + j].A) return;
      const Lora& a = lora_[l * 4 + j];
      using In = std::conditional_t<std::is_same_v<std::decay_t<decltype(*in)>, float>, float, at::BFloat16>;
      row_lora_apply<In, at::BFloat16>(reinterpret_cast<const In*>(in), reinterpret_cast<at::BFloat16*>(y), rs, a.A, a.Bt,
                                       a.ranks, a.widths, a.rows, a.cols, M, a.n_in, a.n_out, a.R, a.S);
    };
    std::vector<float> n32(rs ? M * D_ : 0);  // the norm's fp32 output, for the adapters
    float* n32p = rs ? n32.data() : nullptr;
    for (int64_t r = 0; r < M; ++r)
      TORCH_CHECK(0 <= pos[r] && pos[r] < k.size(3) && pos[r] < positions_, "DecodeStep.run: position ", pos[r], " out of range");
    float* h = x.data_ptr<float>();
    const int64_t qkv = (H_ + 2 * KVH_) * Dh_, A = std::max(D_, H_ * Dh_), B = std::max(qkv, 2 * I_);
    std::vector<bf16> a(M * A), b(M * B), att(M * H_ * Dh_), mid(M * I_);
    std::vector<float> xs;
    bf16* kc = static_cast<bf16*>(k.data_ptr());
    bf16* vc = static_cast<bf16*>(v.data_ptr());
    const int64_t sl = k.stride(0), sr = k.stride(1), sh = k.stride(2), sp = k.stride(3);
    for (int64_t l = 0; l < L_; ++l) {
      const Layer& ly = layers_[l];
      for (int64_t r = 0; r < M; ++r) rms_norm(h + r * D_, ly.attn_norm, D_, eps_, a.data() + r * D_, rs ? n32p + r * D_ : nullptr);
      matmul(ly.m[0], a.data(), M, b.data(), xs);
      adapt(l, 0, n32p, b.data());
      for (int64_t r = 0; r < M; ++r) {
        bf16 *q = b.data() + r * qkv, *kn = q + H_ * Dh_, *vn = kn + KVH_ * Dh_;
        const int64_t p = pos[r];
        rope(q, H_, Dh_, cos_ + p * Dh_, sin_ + p * Dh_);
        rope(kn, KVH_, Dh_, cos_ + p * Dh_, sin_ + p * Dh_);
        for (int64_t j = 0; j < KVH_; ++j) {
          std::memcpy(kc + l * sl + r * sr + j * sh + p * sp, kn + j * Dh_, Dh_ * 2);
          std::memcpy(vc + l * sl + r * sr + j * sh + p * sp, vn + j * Dh_, Dh_ * 2);
        }
      }
      attend(b.data(), qkv, kc + l * sl, vc + l * sl, sr, sh, sp, pos, M, att.data());
      matmul(ly.m[1], att.data(), M, a.data(), xs);
      adapt(l, 1, att.data(), a.data());
      for (int64_t i = 0; i < M * D_; ++i) h[i] += bf(a[i]);
      for (int64_t r = 0; r < M; ++r) rms_norm(h + r * D_, ly.mlp_norm, D_, eps_, a.data() + r * D_, rs ? n32p + r * D_ : nullptr);
      matmul(ly.m[2], a.data(), M, b.data(), xs);
      adapt(l, 2, n32p, b.data());
      for (int64_t r = 0; r < M; ++r) swiglu(b.data() + r * 2 * I_, b.data() + r * 2 * I_ + I_, mid.data() + r * I_);
      matmul(ly.m[3], mid.data(), M, a.data(), xs);
      adapt(l, 3, mid.data(), a.data());
      for (int64_t i = 0; i < M * D_; ++i) h[i] += bf(a[i]);
    }
    std::vector<float> out(D_);
    for (int64_t r = 0; r < M; ++r) {
      rms_norm(h + r * D_, norm_, D_, eps_, nullptr, out.data());
      std::memcpy(h + r * D_, out.data(), D_ * 4);
    }
    return x;
  }

  // The adapter store's stacks (adapters.py, RowLoRA), per layer and matrix (qkv, o, up, down): ints
  // [parts, then each part's row in A and column in y], tensors [A (slots, R, in) fp32, then each
  // part's Bt (slots, r, width) fp32] (none where parts is 0). Pointers into the store's own tensors:
  // a hot load writes them in place and is seen by the next run; cstep.py calls this again whenever
  // the store reallocates a stack.
  void set_lora(std::vector<at::Tensor> tensors, std::vector<int64_t> ints) {
    std::vector<Lora> lora(L_ * 4);
    const int64_t shapes[4][2] = {{(H_ + 2 * KVH_) * Dh_, D_}, {D_, H_ * Dh_}, {2 * I_, D_}, {D_, I_}};
    size_t ti = 0, ii = 0;
    for (int64_t m = 0; m < L_ * 4; ++m) {
      TORCH_CHECK(ii < ints.size(), "DecodeStep.set_lora: ints end early");
      const int64_t parts = ints[ii++];
      if (!parts) continue;
      Lora& a = lora[m];
      a.n_out = shapes[m % 4][0], a.n_in = shapes[m % 4][1];
      TORCH_CHECK(ti + 1 + parts <= tensors.size() && ii + 2 * parts <= ints.size(), "DecodeStep.set_lora: tensors or ints end early");
      const at::Tensor& A = tensors[ti++];
      TORCH_CHECK(A.dim() == 3 && A.scalar_type() == at::kFloat && A.is_contiguous() && A.size(2) == a.n_in,
                  "DecodeStep.set_lora: A of matrix ", m, " (slots, R, ", a.n_in, ") fp32");
      a.A = A.data_ptr<float>(), a.S = A.size(0), a.R = A.size(1);
      for (int64_t p = 0; p < parts; ++p) {
        const at::Tensor& b = tensors[ti++];
        const int64_t row = ints[ii++], col = ints[ii++];
        TORCH_CHECK(b.dim() == 3 && b.scalar_type() == at::kFloat && b.is_contiguous() && b.size(0) == a.S &&
                    row >= 0 && row + b.size(1) <= a.R && col >= 0 && col + b.size(2) <= a.n_out,
                    "DecodeStep.set_lora: Bt ", p, " of matrix ", m, " (slots, r, width) fp32 inside A's rows and y's columns");
        a.Bt.push_back(b.data_ptr<float>());
        a.ranks.push_back(b.size(1)), a.widths.push_back(b.size(2)), a.rows.push_back(row), a.cols.push_back(col);
      }
    }
    TORCH_CHECK(ti == tensors.size() && ii == ints.size(), "DecodeStep.set_lora: more tensors or ints than the parts name");
    lora_ = std::move(lora), lora_held_ = std::move(tensors);
  }

 private:
  struct Lora {
    const float* A = nullptr;  // nullptr: no adapter touches this matrix
    std::vector<const float*> Bt;
    std::vector<int64_t> ranks, widths, rows, cols;
    int64_t n_in = 0, n_out = 0, R = 0, S = 0;
  };
  struct Layer {
    const float* attn_norm;
    const float* mlp_norm;
    Matrix m[4];
  };

  const float* f32(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.numel() == n, "DecodeStep: ", what, " (", n, ",) fp32");
    return t.data_ptr<float>();
  }

  Matrix matrix(const at::Tensor* t, int64_t fmt, int64_t N, int64_t K) {
    Matrix m{fmt, N, K};
    TORCH_CHECK(N % 4 == 0 && K % (fmt == 2 ? 64 : 32) == 0, "DecodeStep: a matrix of ", N, " x ", K, " (format ", fmt, ")");
    const at::Tensor& w = t[0];
    const auto want = fmt == 0 ? at::kBFloat16 : fmt == 1 ? at::kChar : at::kByte;
    TORCH_CHECK(fmt >= 0 && fmt <= 2 && w.is_contiguous() && w.scalar_type() == want &&
                w.numel() == (fmt == 2 ? N * K / 2 : N * K), "DecodeStep: weights of a ", N, " x ", K, " matrix, format ", fmt);
    m.w = w.data_ptr();
    auto halves = [&](const at::Tensor& s, int64_t n, at::ScalarType dtype) -> const bf16* {
      TORCH_CHECK(s.defined() && s.is_contiguous() && s.scalar_type() == dtype && s.numel() == n, "DecodeStep: scales");
      return static_cast<const bf16*>(s.data_ptr());
    };
    if (fmt == 1) m.s = halves(t[1], N, at::kBFloat16);
    if (fmt == 2) m.s = halves(t[1], N * K / 32, at::kHalf), m.z = halves(t[2], N * K / 32, at::kHalf);  // (fp16)
    if (t[3].numel()) m.bias = halves(t[3], N, at::kBFloat16);  // (an empty tensor: no bias)
    return m;
  }

  // Per row r: att (H heads of Dh bf16), q head j (row r of q, rows qs apart) attending over kv head
  // j / (H / KVH) of row r (k and v rows sr apart) at positions 0..pos[r] (decode_attention.h); one
  // (row, q head) per task.
  void attend(const bf16* q, int64_t qs, const bf16* k, const bf16* v, int64_t sr, int64_t sh, int64_t sp,
              const int64_t* pos, int64_t M, bf16* att) const {
    int64_t keys = 0;
    for (int64_t r = 0; r < M; ++r) keys += pos[r] + 1;
    const auto head = Dh_ == 64 ? attend_head<4> : Dh_ == 32 ? attend_head<2> : Dh_ == 128 ? attend_head<8> : attend_head<0>;
    // (a short context is a few microseconds of work: one thread, no fork and join)
    at::parallel_for(0, M * H_, keys >= 256 ? 1 : M * H_, [&](int64_t t0, int64_t t1) {
      std::vector<float> s(FLASH_BLOCK);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t r = task / H_, j = task % H_, kv = r * sr + (j / (H_ / KVH_)) * sh;
        head(q + r * qs + j * Dh_, k + kv, v + kv, sp, pos[r] + 1, Dh_, s.data(), att + (r * H_ + j) * Dh_);
      }
    });
  }

  // mid = bf16(bf16(silu(gate)) * up), as F.silu(gate) * up rounds on bf16 tensors (aten's SiLU:
  // x / (1 + exp(-x)) with Sleef's exp over 32 bf16 at a time, std::exp over the rest)
  void swiglu(const bf16* gate, const bf16* up, bf16* mid) const {
    using Vec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + 32 <= I_; i += 32)
      for (int64_t h = i; h < i + 32; h += 16) {
        const Vec g(load_bf16(gate + h));
        const Vec sg = g / (Vec(1.0f) + g.neg().exp());
        store_bf16(mid + h, _mm512_mul_ps(load_bf16_rounded(sg), load_bf16(up + h)));
      }
    for (; i < I_; ++i) {
      const float g = bf(gate[i]);
      mid[i] = to_bf(round_bf(g / (1.0f + std::exp(-g))) * bf(up[i]));
    }
  }

  std::vector<at::Tensor> held_;  // keeps every pointer below alive
  std::vector<Layer> layers_;
  std::vector<at::Tensor> lora_held_;  // keeps the adapter stacks alive while lora_ points into them
  std::vector<Lora> lora_;
  const float *norm_ = nullptr, *cos_ = nullptr, *sin_ = nullptr;
  int64_t L_ = 0, H_ = 0, KVH_ = 0, Dh_ = 0, D_ = 0, I_ = 0, positions_ = 0;
  double eps_;
};

}  // namespace

namespace {
// One matrix alone, for measuring a format's loop against aten's kernels (cstep.matvec).
at::Tensor step_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, int64_t fmt, int64_t N) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "step_matvec: x (K,) bf16");
  const int64_t K = x.size(0);
  TORCH_CHECK(N % 4 == 0 && K % (fmt == 2 ? 64 : 32) == 0 && w.is_contiguous() && w.numel() == (fmt == 2 ? N * K / 2 : N * K),
              "step_matvec: weights of ", N, " x ", K);
  const int64_t ns = fmt == 1 ? N : N * K / 32;  // int8: a bf16 scale a row; q4: fp16 scale and min a group
  TORCH_CHECK(fmt == 0 || (s.is_contiguous() && s.numel() == ns && s.scalar_type() == (fmt == 1 ? at::kBFloat16 : at::kHalf) &&
                           (fmt == 1 || (z.is_contiguous() && z.numel() == ns && z.scalar_type() == at::kHalf))),
              "step_matvec: scales (int8: bf16 a row; q4: fp16 scales and mins a group)");
  Matrix m{fmt, N, K, w.data_ptr()};
  if (fmt >= 1) m.s = static_cast<const bf16*>(s.data_ptr());
  if (fmt == 2) m.z = static_cast<const bf16*>(z.data_ptr());
  at::Tensor y = at::empty({N}, x.options());
  std::vector<float> xs;
  matmul(m, static_cast<const bf16*>(x.data_ptr()), 1, static_cast<bf16*>(y.data_ptr()), xs);
  return y;
}
// aten's CPU int4 layout (torch._convert_weight_to_int4pack_for_cpu, N % 64 == 0): per 64 rows and
// per input 32 bytes, byte d holding rows d and 32 + d, byte 16 + d rows 16 + d and 48 + d (low
// nibble first). cstep.py checks the result against aten's own kernel before using it.
at::Tensor int4pack_codes(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(N % 64 == 0 && packed.is_contiguous() && packed.scalar_type() == at::kByte && packed.numel() == N * K / 2,
              "int4pack_codes: aten's packed (N, K/2) uint8, N % 64 == 0");
  at::Tensor q = at::empty({N, K}, packed.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* out = q.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t r = n % 64;
      const uint8_t* src = p + (n / 64) * K * 32 + r % 32;
      uint8_t* dst = out + n * K;
      if (r < 32) for (int64_t k = 0; k < K; ++k) dst[k] = src[k * 32] & 15;
      else for (int64_t k = 0; k < K; ++k) dst[k] = src[k * 32] >> 4;
    }
  });
  return q;
}

// Plain codes (N, K) 0..15 -> Q4_LAYOUT
at::Tensor q4_pack(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kByte && q.size(1) % 64 == 0, "q4_pack: codes (N, K % 64 == 0) uint8");
  const int64_t N = q.size(0), K = q.size(1), G4 = K / 128;
  at::Tensor out = at::zeros({N, K / 2}, q.options());
  const uint8_t* in = q.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  std::vector<int32_t> place(K);  // input k -> its byte, + K/2 where it is the high nibble
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = k / 32, w = k % 32;
    if (g < 4 * G4) {
      const int64_t j = g % 4;
      place[k] = (g / 4) * 64 + (w / 8) * 16 + w % 8 + (j % 2) * 8 + (j >= 2 ? K / 2 : 0);
    } else {
      place[k] = G4 * 64 + (g - 4 * G4) / 2 * 32 + w + ((g - 4 * G4) % 2 ? K / 2 : 0);
    }
  }
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int32_t at = place[k];
        o[n * (K / 2) + at % (K / 2)] |= at >= K / 2 ? in[n * K + k] << 4 : in[n * K + k];
      }
  });
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("run", &DecodeStep::run)
      .def("set_lora", &DecodeStep::set_lora);
  m.def("step_matvec(Tensor x, Tensor w, Tensor s, Tensor z, int fmt, int N) -> Tensor", &step_matvec);
  m.def("int4pack_codes(Tensor packed, int N, int K) -> Tensor", &int4pack_codes);
  m.def("q4_pack(Tensor codes) -> Tensor", &q4_pack);
}
