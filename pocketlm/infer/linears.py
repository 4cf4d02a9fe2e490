"""The per-precision linears of the engine's inference copy (see fused.py for the measurements).

Each takes x of any dtype and returns x W^T + b. `takes_batch = False`: they do not read the step's
batch (gpt.project calls them with x alone, without a slow attribute miss on nn.Module).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.infer.gemv import MAX_ROWS, bf16_gemv, f32_gemv, int8_gemv
from pocketlm.infer.gemv import available as gemv_available

PRECISIONS = ("fp32", "bf16", "int8", "int4")
ACTIVATIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}


class DenseLinear(nn.Module):
    """x W^T + b in the weights' dtype."""
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class PackedLinear(nn.Module):
    """bf16 x W^T + b with W reordered once into oneDNN's blocked layout."""
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # an opaque mkldnn tensor, not a buffer
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, "none", [], "")


class GemvLinear(DenseLinear):
    """x W^T + b in bf16 or fp32: the hand-written kernels (gemv.py) for the few rows of a decode step,
    aten's matmul (oneDNN, MKL) for a prompt's many."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__(weight, bias, dtype)
        self.kernel = bf16_gemv if dtype == torch.bfloat16 else f32_gemv

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.weight.dtype)
        y = self.kernel(x, self.weight, self.bias) if x.size(0) <= MAX_ROWS else F.linear(x, self.weight, self.bias)
        return y.view(*shape[:-1], -1)


class Int8Linear(nn.Module):
    """x W^T + b with W stored as int8 rows times one scale per row (symmetric, round to nearest),
    bf16 activations (aten's int8 kernel is ~10x slower with fp32 or fp16 ones). A decode step's few
    rows go to the hand-written kernel (gemv.py: 1.5x aten's at one row, 3x at 8), a prompt's to aten."""
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.gemv = self.qweight.size(1) % 32 == 0 and gemv_available()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.gemv and x.size(0) <= MAX_ROWS:
            return int8_gemv(x, self.qweight, self.scale, self.bias).view(*shape[:-1], -1)
        y = torch._weight_int8pack_mm(x, self.qweight, self.scale).view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weight rows `ids`, in fp32."""
        return self.qweight[ids].float() * self.scale[ids, None].float()


class Int4Linear(nn.Module):
    """x W^T + b with W in 4 bits, in groups of GROUP inputs that each have a scale and a zero
    (w = (q - 8) * scale + zero, q in 0..15), bf16 activations (torch._weight_int4pack_mm_for_cpu).
    Scale and zero come from each group's min and max. GGUF's Q4_1 stores blocks of 32 as
    min + step * (0..15) with the block's min and max at 0 and 15, so a Q4_1 file's weights come
    back exactly (up to bf16 scales and zeros)."""
    GROUP = 32
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32).view(N, K)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight,
                                                       self.GROUP, self.scales_zeros)
        y = y.view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def make_linear(weight, bias, precision: str, compiled: bool = False) -> nn.Module:
    if precision == "int4" and weight.size(1) % Int4Linear.GROUP == 0:
        return Int4Linear(weight, bias)
    if precision in ("int8", "int4"):  # (int4 needs whole groups of inputs)
        return Int8Linear(weight, bias)
    if precision in ("bf16", "fp32") and weight.size(1) % 32 == 0 and gemv_available():
        return GemvLinear(weight, bias, ACTIVATIONS[precision])
    if precision == "bf16" and not compiled and onednn_bf16():
        return PackedLinear(weight, bias)  # (torch.compile with freezing packs plain weights itself)
    return DenseLinear(weight, bias, ACTIVATIONS[precision])


def onednn_bf16() -> bool:
    """oneDNN's packed bf16 matmul needs AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on AVX2-only CPUs aten's
    plain bf16 matmul runs instead (DenseLinear)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
