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
          4-bit, lossier than int8. Its LM head is int8g, which holds a Q8_0 token table exactly.
    int8g int8 weights in groups of 32, a scale and a zero each (a Q8_0 block exactly, a Q4_1 block to
          fp32 rounding, full-precision weights the finer of a symmetric and a min/max fit), bf16 activations; aten
          has no kernel for it, so a batched matmul over the groups (linears.Int8GroupLinear): exact,
          but ~4x the time of row-wise int8 at one row on an AVX2 CPU (the int8 -> fp32 widening).
          `--dtype auto`'s choice for Q8_0 files and full-precision checkpoints.

The copy is a GPT (pocketlm/model/gpt.py) whose modules are swapped in place, so GPT.forward is the
one forward: its linears become the kernels above (pocketlm/infer/linears.py), its attention and MLP
become subclasses whose projection hooks (project_qkv, hidden) call one fused matrix for q/k/v and
one for gate/up (fewer, larger kernel calls: at one row each call's fixed cost is a large share), its
embedding hands the residual stream fp32, its head is Head. The residual stream and the norms stay fp32 at every precision; only
the matrices' inputs round to bf16, which halves bf16's error against fp32 (mean |logit error| on
SmolLM2 0.05 instead of 0.10) for no measurable time. The LM head gives fp32 logits (see Head).

    model = inference_copy(gpt, "int8")   # a GPT: model(ids, batch=store.step(...)) -> fp32 logits
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import InputError
from pocketlm.infer.linears import ACTIVATIONS, PRECISIONS, PackedLinear, make_linear
from pocketlm.model.gpt import GPT, MLP, Attention, gelu_tanh, project, rope_tables

__all__ = ["ACTIVATIONS", "PRECISIONS", "Head", "inference_copy", "weight_bytes_per_token"]

# A 4-bit head would lose more than a Q4 file's own (often Q8_0) table. Row-wise int8 with the fp32
# refinement of the best candidates (Head) stays: group-wise int8 would hold a Q8_0 table exactly but
# its aten path took 212 ms a token on SmolLM2's 49152 x 576 head against 31 ms (AVX2 EPYC).
HEAD_PRECISION = {"int4": "int8"}
FAITHFUL = ("int8g", "int4")  # precisions that hold a GGUF file's own blocks: their token table stays fp32 too
REFINED = 32  # candidates per position whose logits the bf16 and int8 heads recompute in fp32


class Head(nn.Module):
    """The LM head, with fp32 logits at every precision. At bf16 and int8 the fast kernel scores the
    whole vocabulary but rounds its output to bf16 (steps of 0.125 near 25: close greedy choices flip,
    SmolLM2 says "L'Étoile" rather than "Paris"), so the REFINED best are recomputed in fp32 from their
    weight rows: exactly what an fp32 head over the same weights gives for them (greedy, top-k/p and
    min-p look at those), the rest of the vocabulary stays within bf16 rounding. An fp32 head would
    read twice (bf16) or four times (int8) the bytes; it was ~30% of a bf16 decode step. At int4/int8g a tied
    head recomputes them from the fp32 token table itself (`exact`: the embedding's, no copy), the file's
    own (Q8_0) values, not the int8 re-quantization's rows: on SmolLM2 Q4_1 those rows alone flipped
    ~2% of greedy choices against fp32 (BENCHMARKS.md, "int4 against fp32: which error")."""

    def __init__(self, weight: torch.Tensor, precision: str, rows: torch.Tensor | None = None, compiled: bool = False,
                 exact: torch.Tensor | None = None):
        super().__init__()
        precision = HEAD_PRECISION.get(precision, precision)
        if precision == "bf16" and rows is not None:  # a tied table: kernels on plain weights share it, no copy
            weight = rows
        self.fast = make_linear(weight, None, precision, compiled)
        self.precision = precision
        if precision == "bf16":  # the weights the fast kernel uses, unpacked (a tied table can be shared)
            self.register_buffer("rows", rows if rows is not None else weight.detach().to(torch.bfloat16))
        elif exact is not None and precision in ("int8", "int8g"):
            self.register_buffer("rows", exact)  # fp32 (named rows: weight_bytes_per_token skips it)

    def forward(self, x):
        logits = self.fast(x).float()
        if self.precision == "fp32":
            return logits
        top = logits.topk(REFINED, dim=-1).indices
        table = getattr(self, "rows", None)  # (int8/int8g without a tied fp32 table read their own int8 rows)
        rows = self.fast.rows(top) if table is None else table[top].float()
        refined = (rows @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, top, refined)



class Embedding32(nn.Module):
    """A token table in the precision's dtype that hands the residual stream fp32 rows."""
    takes_batch = False

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())

    def forward(self, ids):
        return F.embedding(ids, self.weight).float()


def _copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private copy in `dtype`: casting the GPT's own module would change the caller's model."""
    return copy.deepcopy(module).to(dtype)


def _cat(precision, compiled, *linears: nn.Linear | None):
    """One kernel over the rows of several projections that read the same input."""
    linears = [m for m in linears if m is not None]
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return make_linear(weight, bias, precision, compiled)


def _kernel(linear: nn.Linear, precision, compiled):
    return make_linear(linear.weight, linear.bias, precision, compiled)


class FusedAttention(Attention):
    """GPT's attention (its forward, unchanged) with q/k/v read from one fused matrix, `qkv`."""

    def __init__(self, attn: Attention, precision: str, compiled: bool):
        nn.Module.__init__(self)  # not Attention.__init__: no fresh weights to throw away
        cfg = self.cfg = attn.cfg
        self.layer_idx = attn.layer_idx
        self.qkv = _cat(precision, compiled, attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = _kernel(attn.o_proj, precision, compiled)
        self.resid_dropout = nn.Identity()
        self.splits = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
        self.parts = {"q_proj": self.splits[0], "k_proj": self.splits[1], "v_proj": self.splits[2]}

    def project_qkv(self, x, batch):
        return project(self.qkv, x, batch).split(self.splits, dim=-1)


class FusedMLP(MLP):
    """GPT's MLP with gate/up (SwiGLU) read from one fused matrix, `up`."""

    def __init__(self, mlp: MLP, precision: str, compiled: bool):
        nn.Module.__init__(self)
        self.swiglu = mlp.swiglu
        self.up = _cat(precision, compiled, mlp.gate_proj if mlp.swiglu else None, mlp.up_proj)
        self.down_proj = _kernel(mlp.down_proj, precision, compiled)
        self.dropout = nn.Identity()
        width = mlp.up_proj.out_features
        self.parts = {"gate_proj": width, "up_proj": width} if mlp.swiglu else {"up_proj": width}

    def hidden(self, x, batch):
        h = project(self.up, x, batch)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return gelu_tanh(h)


def inference_copy(model: GPT, precision: str = "fp32", compiled: bool = False) -> GPT:
    """The engine's copy of `model` at `precision`: the same GPT class and forward, eval mode, its
    modules swapped for the kernels (the caller's model is untouched). compiled: it will run under
    torch.compile (which cannot trace oneDNN-packed weights)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    cfg, dtype = model.cfg, ACTIVATIONS[precision]
    with torch.device("meta"):
        twin = GPT(cfg)  # the skeleton; every module holding weights is replaced below
    with torch.no_grad():
        twin.embed_tokens = Embedding32(model.embed_tokens.weight, torch.float32 if precision in FAITHFUL else dtype)
        tied = model.lm_head.weight is model.embed_tokens.weight
        shared = twin.embed_tokens.weight if tied and twin.embed_tokens.weight.dtype == torch.bfloat16 else None
        table = twin.embed_tokens.weight if tied and twin.embed_tokens.weight.dtype == torch.float32 else None
        twin.lm_head = Head(model.lm_head.weight, precision, shared, compiled, exact=table if precision in FAITHFUL else None)
        if cfg.arch == "gpt2":
            twin.embed_positions = _copy(model.embed_positions, torch.float32)
        for mine, theirs in zip(twin.layers, model.layers):
            mine.attn_norm, mine.mlp_norm = _copy(theirs.attn_norm, torch.float32), _copy(theirs.mlp_norm, torch.float32)
            mine.attn = FusedAttention(theirs.attn, precision, compiled)
            mine.mlp = FusedMLP(theirs.mlp, precision, compiled)
        twin.norm = _copy(model.norm, torch.float32)
    twin.embed_dropout = nn.Identity()
    twin.eval().requires_grad_(False)
    # RoPE tables for every position the model can see, made once: the compiled engine skips guards
    # on module state, so forward must not change any
    device = model.embed_tokens.weight.device
    if cfg.arch != "gpt2":
        twin._rope_cache = rope_tables(cfg, cfg.block_size, device)
    twin.precision = precision
    twin.n_params = model.num_params(non_embedding=False)
    return twin


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one decode step of an inference copy reads (everything but the embedding
    table, of which it reads a row per token; a tied head reads its own copy)."""
    total = 0
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith((".scale16", ".min16")):  # int4: the C++ step reads these, aten scales_zeros: one or the other
            continue
        if not name.startswith(("embed_tokens", "embed_positions", "lm_head.rows")):  # only REFINED rows read
            total += t.numel() * t.element_size()
    for m in model.modules():  # oneDNN-packed weights are plain attributes
        if isinstance(m, PackedLinear):
            total += m.weight.numel() * 2 + (0 if m.bias is None else m.bias.numel() * 2)
    return total
