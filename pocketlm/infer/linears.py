"""The per-precision linears of the engine's inference copy (see fused.py for the measurements).

Each takes x of any dtype and returns x W^T + b. `takes_batch = False`: they do not read the step's
batch (gpt.project calls them with x alone, without a slow attribute miss on nn.Module).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.infer.gemv import MAX_ROWS, bf16_gemv, f32_gemv, int8_gemv
from pocketlm.infer.gemv import available as gemv_available

PRECISIONS = ("fp32", "bf16", "int8", "int8g", "int4")
ACTIVATIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int8g": torch.bfloat16,
               "int4": torch.bfloat16}
GROUP = 32  # inputs per scale of int8g and int4 (GGUF's Q8_0, Q4_0 and Q4_1 blocks)


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


# A forward of at least this many tokens a row (a prompt's prefill, an extend) multiplies by a bf16 copy of
# a quantized matrix through oneDNN instead of aten's int4/int8 weight-only kernels, for 2 bytes a weight
# more memory. Measured on 2 Zen 5 cores (AVX512-BF16) on a 3072 x 576 matrix: aten's int4 kernel costs
# ~0.023 ms a row at any count, packed bf16 0.093 ms at 4 rows (1.2x faster), 0.294 at 32 (2.6x), 0.594
# at 64 (2.4x) (benchmarks/prefill_matmul.py). Decode steps stay on the quantized weights (see _dense).
DENSE_ROWS = 4


def dense_prefill(compiled: bool = False) -> bool:
    """Whether quantized linears keep that bf16 copy: oneDNN's bf16 matmul runs natively (onednn_bf16),
    the step is not compiled (it cannot trace packed weights) and POCKETLM_DENSE_PREFILL is not 0."""
    return not compiled and os.environ.get("POCKETLM_DENSE_PREFILL", "1") != "0" and onednn_bf16()


def _dense(module: nn.Module, shape) -> bool:
    """A prompt's forward (DENSE_ROWS tokens or more a row: x is (..., T, K)) takes the bf16 copy; a
    decode step of any number of rows (T = 1) keeps the quantized weights, so it computes what the C++
    decode step (cstep.py) computes."""
    return module.prefill is not None and len(shape) >= 2 and shape[-2] >= DENSE_ROWS


def _attach_prefill(module: nn.Module, dequantized: torch.Tensor | None, bias) -> None:
    """Keep the bf16 copy outside the module's buffers (not saved, not seen by state_dict or cstep)."""
    module.__dict__["prefill"] = None if dequantized is None else PackedLinear(dequantized, bias)


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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool = False):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.gemv = self.qweight.size(1) % 32 == 0 and gemv_available()
        _attach_prefill(self, self.qweight.float() * self.scale.float()[:, None] if prefill else None, self.bias)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if _dense(self, shape):
            return self.prefill(x).view(*shape[:-1], -1)
        if self.gemv and x.size(0) <= MAX_ROWS:
            return int8_gemv(x, self.qweight, self.scale, self.bias).view(*shape[:-1], -1)
        y = torch._weight_int8pack_mm(x, self.qweight, self.scale).view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weight rows `ids`, in fp32."""
        return self.qweight[ids].float() * self.scale[ids, None].float()


def best_fit(g: torch.Tensor, fits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of the groups g (..., GROUP) under the fit with the smallest largest error per group:
    fits are (scale, offset, least code, most code), w = q * scale + offset; a tie keeps the earlier
    fit. Returns the codes (fp32) and each group's scale and offset."""
    best = None
    for scale, offset, least, most in fits:
        q = torch.round((g - offset[..., None]) / scale[..., None]).clamp(least, most)
        err = (q * scale[..., None] + offset[..., None] - g).abs().amax(-1)
        if best is None:
            best = [q, scale, offset, err]
        else:
            better = err < best[3]
            best = [torch.where(better[..., None], q, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, offset, best[2]), torch.minimum(err, best[3])]
    return best[0], best[1], best[2]


class Int8GroupLinear(nn.Module):
    """x W^T + b with W as int8 codes in groups of GROUP inputs, a scale and a zero each (w = q * scale +
    zero). Each group takes the better of two fits (the smaller largest error; a tie keeps the first):
    symmetric (zero = 0, scale = max |w| / 127), GGUF Q8_0's block, so a Q8_0 file's weights come back
    bit for bit; and min/max (scale = (max - min) / 255, the min at code -128), which holds a Q4_1
    block's 16 levels (17 codes apart: its min and max are levels 0 and 15) to fp32 rounding, and
    has a finer step than the symmetric fit on any group whose weights lean to one side. The symmetric
    fit alone re-quantized SmolLM2's Q4_1 weights at 97.2% top-1 against fp32 of them (KL 0.0018;
    BENCHMARKS.md, "int8g"). fp32 scales and zeros: with fp16 ones the codes of a Q4_1 block would
    not be exact (4 bytes a group more than a Q8_0 block's 2; this path is bound by per-op cost, not
    by the bytes it reads). No aten kernel takes a scale
    per group, so a decode step's few rows take one batched matmul over the groups (fp32) and the
    scales and zeros after; a prompt's many rows dequantize the matrix once. Measured at one row on 2
    cores (AVX2), per SmolLM2 matrix: ~1-4x aten's row-wise int8 kernel's time, far faster than one
    torch._weight_int8pack_mm per group (a call per 32 inputs) or dequantizing per call."""
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool = False):
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        symmetric = g.abs().amax(-1).clamp(min=1e-30) / 127
        spread = (hi - lo).clamp(min=1e-30) / 255
        q, scale, zero = best_fit(g, [(symmetric, torch.zeros_like(symmetric), -127, 127),
                                      (spread, lo + 128 * spread, -128, 127)])  # (the min at code -128)
        self.register_buffer("qweight", q.to(torch.int8).permute(1, 2, 0).contiguous())  # (groups, GROUP, N): bmm's right side
        self.register_buffer("scale", scale.t().contiguous())  # (groups, N), fp32
        # (groups, N), fp32; None where every group is symmetric (a Q8_0 file's): no zero term to add
        self.register_buffer("zero", zero.t().contiguous() if zero.any() else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        _attach_prefill(self, self.dequantized() if prefill else None, self.bias)

    def forward(self, x):
        shape = x.shape
        if _dense(self, shape):
            return self.prefill(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)
        x = x.reshape(-1, shape[-1]).float()
        G, _, N = self.qweight.shape
        if x.size(0) <= 16:
            xg = x.view(-1, G, GROUP)  # (M, G, GROUP)
            parts = torch.bmm(xg.transpose(0, 1), self.qweight.float())  # (G, M, N)
            y = (parts * self.scale[:, None, :]).sum(0)
            if self.zero is not None:  # + each group's zero times the sum of its inputs: one (M, G) x (G, N)
                y = torch.addmm(y, xg.sum(-1), self.zero)
        else:
            y = F.linear(x, self.dequantized())
        y = y.to(torch.bfloat16).view(*shape[:-1], N)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weights (N, K) in fp32."""
        G, _, N = self.qweight.shape
        w = self.qweight.float() * self.scale[:, None, :]
        w = w if self.zero is None else w + self.zero[:, None, :]
        return w.permute(2, 0, 1).reshape(N, G * GROUP)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized weight rows `ids`, in fp32."""
        flat = ids.reshape(-1)
        w = self.qweight[:, :, flat].float() * self.scale[:, None, flat]  # (G, GROUP, n)
        w = w if self.zero is None else w + self.zero[:, None, flat]
        return w.permute(2, 0, 1).reshape(*ids.shape, -1)


class Int4Linear(nn.Module):
    """x W^T + b with W in 4 bits, in groups of GROUP inputs that each have a scale and a zero
    (w = (q - 8) * scale + zero, q in 0..15), bf16 activations (torch._weight_int4pack_mm_for_cpu).
    Each group takes the better of two fits: min/max (scale = (max - min) / 15, zero = min + 8 scale),
    which is GGUF Q4_1's block (min + d * (0..15) with the min and max at 0 and 15), and symmetric
    (zero = 0, scale = the value of largest magnitude / -8), which is Q4_0's (d * (q - 8), the largest
    magnitude at q = 0). The fits are made with fp16 scales and mins (w = q * scale + min, min = zero -
    8 scale), a Q4 block's own fp16 d and m, so a Q4_0 or Q4_1 file's weights come back exactly in
    `scale16`/`min16`, which the C++ decode step reads (cstep.py). aten's kernel takes bf16 scales and
    zeros only (`scales_zeros`, converted from those): 3 mantissa bits fewer, an error shared by a
    group's 32 weights (on SmolLM2 Q4_1 it cost ~1 point of top-1 against fp32; see BENCHMARKS.md)."""
    GROUP = GROUP
    takes_batch = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool = False):
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // GROUP, GROUP)
        half = torch.float16
        tiny = 2.0 ** -24  # fp16's smallest step: a scale never rounds to 0
        lo, hi = g.amin(-1), g.amax(-1)
        fits = []
        scale = ((hi - lo) / 15).to(half).float().clamp(min=tiny)
        fits.append((scale, lo.to(half).float()))  # Q4_1: min at q = 0
        big = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = (big / -8).to(half).float()
        scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
        fits.append((scale, -8 * scale))  # Q4_0: d * (q - 8); -8 d is exact in fp16
        q, scale, low = best_fit(g, [(s, low, 0, 15) for s, low in fits])
        dense = (q * scale[..., None] + low[..., None]).view(N, K) if prefill else None
        q = q.to(torch.int32).view(N, K)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        zero = low + 8 * scale  # aten's form: w = (q - 8) * scale + zero
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        # (N, K/32) fp16 each: the same bytes a step reads as bf16 would be; not saved (rebuilt at load)
        self.register_buffer("scale16", scale.to(half).contiguous(), persistent=False)
        self.register_buffer("min16", low.to(half).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        _attach_prefill(self, dense, self.bias)

    def forward(self, x):
        shape = x.shape
        if _dense(self, shape):
            return self.prefill(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight,
                                                       self.GROUP, self.scales_zeros)
        y = y.view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def make_linear(weight, bias, precision: str, compiled: bool = False) -> nn.Module:
    prefill = dense_prefill(compiled)
    if precision == "int4" and weight.size(1) % Int4Linear.GROUP == 0:
        return Int4Linear(weight, bias, prefill)
    if precision == "int8g" and weight.size(1) % GROUP == 0:
        return Int8GroupLinear(weight, bias, prefill)
    if precision in ("int8", "int8g", "int4"):  # (int4 and int8g need whole groups of inputs)
        return Int8Linear(weight, bias, prefill)
    if precision in ("bf16", "fp32") and weight.size(1) % 32 == 0 and gemv_available():
        return GemvLinear(weight, bias, ACTIVATIONS[precision])
    if precision == "bf16" and not compiled and onednn_bf16():
        return PackedLinear(weight, bias)  # (torch.compile with freezing packs plain weights itself)
    return DenseLinear(weight, bias, ACTIVATIONS[precision])


def onednn_bf16() -> bool:
    """oneDNN's packed bf16 matmul needs AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on AVX2-only CPUs aten's
    plain bf16 matmul runs instead (DenseLinear)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_kind() -> str:
    from pocketlm import native

    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if native.has(flag):
            return f"{name} CPU"
    return "CPU without AVX2"


KERNELS = {"int4": "int4 (groups of 32, scale and zero) via aten's int4pack kernel",
           "int8g": "int8 (groups of 32, a scale and a zero each) via aten bmm over the groups",
           "int8": "int8 (one scale per row) via {gemv}",
           "bf16": "bf16 via {gemv}", "fp32": "fp32 via {gemv}"}


def describe(precision: str, source: str | None = None) -> str:
    """The one line the engine prints at start: which kernel each part of a decode step runs."""
    from pocketlm.infer.gemv import uses_amx, why_not

    off = why_not()
    gemv = "aten" if off else ("hand-written AMX/AVX512 gemv kernels" if uses_amx() else "hand-written AVX512 gemv kernels")
    if precision == "bf16" and off and onednn_bf16():
        gemv = "oneDNN's packed bf16 matmul"
    line = f"decode: {KERNELS[precision].format(gemv=gemv)}"
    if source:
        line += f" (the file's {source} weights)"
    line += f", {cpu_kind()}; hand-written gemv kernels {'off: ' + off if off else 'on'}"
    if precision == "int4":
        line += f"; LM head: {KERNELS['int8'].format(gemv=gemv)}"
    if precision in ("int8", "int8g", "int4") and dense_prefill():
        line += f"; prompts of {DENSE_ROWS}+ tokens: a bf16 copy of the weights via oneDNN"
    return line
