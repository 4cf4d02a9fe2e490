"""The model as the engine runs it: fused projections and the fastest linear kernel per precision.

At batch 1 a decode step is one matrix-vector product per weight matrix (120 for SmolLM2-135M) plus
the LM head, so the kernel that reads the weights decides the speed (measured on 2 cores, one row):

    fp32  fp32 weights; up to 16 rows (a decode step's streams) through the hand-written AVX512
          kernel in gemv.py (MKL's sgemm drops from ~27 GB/s at one row to ~11 at 8), more through MKL.
    bf16  bf16 weights; up to 16 rows through gemv.py: AVX512-BF16 at one row (~2x oneDNN's bf16
          matmul, which is no faster than fp32 here at one row although it reads half the bytes), AMX
          tiles for 2..16 rows, where 8 rows take ~1.2x the time of one. Without AVX512-BF16 (or a
          compiler), oneDNN's prepacked weights.
    int8  int8 weights, one scale per output row, bf16 activations; up to 16 rows through gemv.py
          (widened to bf16 on the fly; ~1.3x bf16's speed at one row), more through aten's
          torch._weight_int8pack_mm. Weight-only.
    int4  4-bit weights in groups of 32 with a scale and a zero each (GGUF Q4_1's layout: a Q4_1
          file's own weights, exactly), int8 LM head, through torch._weight_int4pack_mm_for_cpu
          (a widening kernel like int8's was tried: with a scale and zero per 32 weights it was slower
          than aten's up to 4 rows, 1.3x faster at 8). For other models it is round-to-nearest
          4-bit, lossier than int8.

q/k/v and gate/up are fused into one matrix each (fewer, larger kernel calls: at one row each call's
fixed cost is a large share). The residual stream and the norms stay fp32 at every precision; only
the matrices' inputs round to bf16, which halves bf16's error against fp32 (mean |logit error| on
SmolLM2 0.05 instead of 0.10) for no measurable time. The LM head gives fp32 logits (see Head).

    model = FusedGPT(gpt, "int8")      # then like GPT: model(ids, cache=cache) -> last position's logits
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.infer.gemv import MAX_ROWS, bf16_gemv, f32_gemv, int8_gemv
from pocketlm.infer.gemv import available as gemv_available
from pocketlm.model.gpt import GPT, apply_rope, rope_tables
from pocketlm.errors import InputError

PRECISIONS = ("fp32", "bf16", "int8", "int4")
ACTIVATIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}


class DenseLinear(nn.Module):
    """x W^T + b in the weights' dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class PackedLinear(nn.Module):
    """bf16 x W^T + b with W reordered once into oneDNN's blocked layout."""

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


HEAD_PRECISION = {"int4": "int8"}  # a 4-bit head would lose more than a Q4 file's own (often 8-bit) table
REFINED = 32  # candidates per position whose logits the bf16 and int8 heads recompute in fp32


class Head(nn.Module):
    """The LM head, with fp32 logits at every precision. At bf16 and int8 the fast kernel scores the
    whole vocabulary but rounds its output to bf16 (steps of 0.125 near 25: close greedy choices flip,
    SmolLM2 says "L'Étoile" rather than "Paris"), so the REFINED best are recomputed in fp32 from their
    weight rows: exactly what an fp32 head over the same weights gives for them (greedy, top-k/p and
    min-p look at those), the rest of the vocabulary stays within bf16 rounding. An fp32 head would
    read twice (bf16) or four times (int8) the bytes; it was ~30% of a bf16 decode step."""

    def __init__(self, weight: torch.Tensor, precision: str, rows: torch.Tensor | None = None, compiled: bool = False):
        super().__init__()
        precision = HEAD_PRECISION.get(precision, precision)
        if precision == "bf16" and rows is not None:  # a tied table: kernels on plain weights share it, no copy
            weight = rows
        self.fast = make_linear(weight, None, precision, compiled)
        self.precision = precision
        if precision == "bf16":  # the weights the fast kernel uses, unpacked (a tied table can be shared)
            self.register_buffer("rows", rows if rows is not None else weight.detach().to(torch.bfloat16))

    def forward(self, x):
        logits = self.fast(x).float()
        if self.precision == "fp32":
            return logits
        top = logits.topk(REFINED, dim=-1).indices
        rows = self.fast.rows(top) if self.precision == "int8" else self.rows[top].float()
        exact = (rows @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, top, exact)


def _copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private copy in `dtype`: casting the GPT's own module would change the caller's model."""
    return copy.deepcopy(module).to(dtype)


def _cat(*linears: nn.Linear | None):
    linears = [m for m in linears if m is not None]
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return weight, bias


class FusedBlock(nn.Module):
    def __init__(self, block, cfg, precision: str, compiled: bool):
        super().__init__()
        a, m = block.attn, block.mlp
        self.cfg, self.layer_idx = cfg, a.layer_idx
        self.register_buffer("layer_id", torch.tensor([[a.layer_idx]]), persistent=False)  # (1, 1): an index, not .item()
        self.attn_norm, self.mlp_norm = _copy(block.attn_norm, torch.float32), _copy(block.mlp_norm, torch.float32)
        self.qkv = make_linear(*_cat(a.q_proj, a.k_proj, a.v_proj), precision, compiled)
        self.o_proj = make_linear(a.o_proj.weight, a.o_proj.bias, precision, compiled)
        self.swiglu = m.swiglu
        self.up = make_linear(*_cat(m.gate_proj if m.swiglu else None, m.up_proj), precision, compiled)
        self.down_proj = make_linear(m.down_proj.weight, m.down_proj.bias, precision, compiled)
        self.splits = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)

    def _store(self, buf, new, at):
        """Write new keys or values (B, H, T, D) at each row's positions; return this layer's cache up
        to `end`. One index_put_ into the whole (L, B, H, S, D) cache: compiled, that stays an in-place
        write of T positions (a slice assignment into a view of it compiles to a copy of all of it)."""
        rows, positions, end = at
        buf[self.layer_id, rows, :, positions] = new.transpose(1, 2)
        return buf[self.layer_idx, :, :, :end]

    def forward(self, x, rope, cache, mask, at):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(self.splits, dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = self._store(cache.k, k, at), self._store(cache.v, v, at)
        gqa = cfg.n_kv_head != cfg.n_head
        if mask is None:  # one row: plain causal attention (T == 1 sees every cached key)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))
        h = self.up(self.mlp_norm(x))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return x + self.down_proj(h)


class FusedGPT(nn.Module):
    """Inference-only twin of a GPT, built from a copy of its weights: the same forward with a KV
    cache (a KVCache, or the engine's rows of one), returning fp32 logits."""

    def __init__(self, model: GPT, precision: str = "fp32", compiled: bool = False):
        """compiled: it will run under torch.compile (which cannot trace oneDNN-packed weights)."""
        super().__init__()
        if precision not in PRECISIONS:
            raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        dtype = ACTIVATIONS[precision]
        cfg = self.cfg = model.cfg
        self.precision = precision
        self.n_params = model.num_params(non_embedding=False)
        with torch.no_grad():
            self.embed_tokens = _copy(model.embed_tokens, dtype)
            tied = model.lm_head.weight is model.embed_tokens.weight
            self.lm_head = Head(model.lm_head.weight, precision, self.embed_tokens.weight if tied else None, compiled)
            self.embed_positions = _copy(model.embed_positions, torch.float32) if cfg.arch == "gpt2" else None
            self.layers = nn.ModuleList(FusedBlock(b, cfg, precision, compiled) for b in model.layers)
            self.norm = _copy(model.norm, torch.float32)
        # RoPE tables for every position the model can see, made once: the compiled engine skips
        # guards on module state, so forward must not change any
        cos, sin = rope_tables(cfg, cfg.block_size, model.embed_tokens.weight.device) if cfg.arch != "gpt2" else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, cache):
        B, T = idx.shape
        positions = cache.lengths[:, None] + torch.arange(T, device=idx.device)
        mask = cache.mask(positions)
        x = self.embed_tokens(idx).float()  # the residual stream stays fp32 (see the module docstring)
        rope = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        else:
            rope = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        at = (torch.arange(B, device=idx.device)[:, None], positions, cache.end(T))  # rows, positions, cache end
        for layer in self.layers:
            x = layer(x, rope, cache, mask, at)
        cache.lengths += T
        return self.lm_head(self.norm(x[:, -1:]))  # the engine reads the last position only

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (everything but the embedding table and the RoPE
        tables, of which it reads a row per token; a tied head reads its own copy)."""
        total = 0
        for name, t in list(self.named_buffers()) + list(self.named_parameters()):
            if not name.startswith(("embed_tokens", "embed_positions", "rope_", "lm_head.rows")):  # only REFINED rows read
                total += t.numel() * t.element_size()
        for m in self.modules():  # oneDNN-packed weights are plain attributes
            if isinstance(m, PackedLinear):
                total += m.weight.numel() * 2 + (0 if m.bias is None else m.bias.numel() * 2)
        return total
