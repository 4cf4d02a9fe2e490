"""A decode step of a llama-arch model in one C++ call (pocketlm/csrc/decode_step.cpp), for one row or many.

At batch 1 the eager step is bound by per-op cost, not by the weights it reads: SmolLM2-135M's step
is 30 layers x ~15 ops, each a Python call and an aten dispatch, for ~100 MB of weights that the
machine reads in well under 2 ms. The C++ step runs every layer and the final norm from one call,
with AVX512-BF16 matrix-vector loops (bf16 and row-wise int8 on the engine's own weights; int4's
Q4_1-style groups repacked once into a layout its loop widens cheaply, ~66 MB more for SmolLM2)
threaded over output rows as gemv.py's are. A step of many rows (continuous batching) reads each
weight once for all of them: the loops widen a block of weight rows once and sum it against every
row's input (a small-M matmul), so 16 rows cost far less than 16 steps. The engine's own embedding
and LM head (Head: fp32 logits, the refined top candidates) stay in Python, one call each. Numerics follow the eager step's
roundings (decode_step.cpp lists them), so its logits agree with the eager step's to bf16 rounding.

It runs where the hand-written kernels do (AVX512-BF16, POCKETLM_KERNELS not 0, the build works) for
bf16, int8 and int4 copies of llama-arch models with a bf16 KV store, for a decode step (one token
per row, any number of rows), with or without per-row LoRA adapters (adapters.py's stacks, applied
after each projection by row_lora.h's loop, the per-op model's row_lora.cpp arithmetic); any other
step (a prefill, an extend) goes to the model itself. POCKETLM_CSTEP=0 turns it off alone.

    forward = decoder(engine_model, kv_store)      # the model itself where the C++ step cannot run
    logits = forward(ids, batch=store.step(0, 1, ids))
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn as nn

from pocketlm import native
from pocketlm.infer import gemv
from pocketlm.infer.adapters import RowLoRA
from pocketlm.infer.linears import GemvLinear, Int4Linear, Int8Linear
from pocketlm.model.gpt import RMSNorm

BF16, INT8, Q4 = 0, 1, 2  # decode_step.cpp's weight formats
PRECISIONS = ("bf16", "int8", "int4")


def why_not(model: nn.Module, store) -> str | None:
    """Why the C++ step cannot run this engine copy and KV store (None where it can)."""
    off = gemv.why_not()
    if off:
        return off
    if os.environ.get("POCKETLM_CSTEP", "1") == "0":
        return "POCKETLM_CSTEP=0"
    cfg = model.cfg
    if cfg.arch != "llama":
        return f"arch {cfg.arch}"
    if getattr(model, "precision", None) not in PRECISIONS:
        return f"precision {getattr(model, 'precision', None)}"
    if store.k.dtype != torch.bfloat16:
        return f"KV store in {store.k.dtype}"
    if cfg.head_dim % 32 or cfg.head_dim > 256:
        return f"head_dim {cfg.head_dim} (needs a multiple of 32, at most 256)"
    if not all(isinstance(n, RMSNorm) for b in model.layers for n in (b.attn_norm, b.mlp_norm)):
        return "norms other than RMSNorm"
    for name, m in _linears(model):
        reason = _unsupported(m)
        if reason:
            return f"{name}: {reason}"
    return None if _built() else "decode_step.cpp did not build"


@functools.cache
def _built() -> bool:
    try:
        native.build("pocketlm_decode_step", "decode_step.cpp", ["-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"])
        return True
    except Exception as e:  # noqa: BLE001 (an unusual toolchain: the eager step still works)
        warnings.warn(f"the C++ decode step is unavailable, decoding eagerly ({type(e).__name__}: {e})")
        return False


def _block_linears(b, wrapped: bool = False) -> dict[str, nn.Module]:
    """One block's matrices in the order decode_step.cpp takes them: the base linears under any adapter
    wrapper (RowLoRA), or with `wrapped` the modules as they sit (RowLoRA where adapters were added)."""
    ms = {"qkv": b.attn.qkv, "o_proj": b.attn.o_proj, "up": b.mlp.up, "down_proj": b.mlp.down_proj}
    return ms if wrapped else {k: m.base if isinstance(m, RowLoRA) else m for k, m in ms.items()}


def _linears(model):
    for i, b in enumerate(model.layers):
        for name, m in _block_linears(b).items():
            yield f"layers.{i}.{name}", m


def _unsupported(m: nn.Module) -> str | None:
    if isinstance(m, Int4Linear):
        n, k = m.scales_zeros.size(1), m.scales_zeros.size(0) * Int4Linear.GROUP
        return None if k % 64 == 0 and n % 4 == 0 else f"int4 {n} x {k} (needs inputs % 64, outputs % 4)"
    if isinstance(m, Int8Linear):
        n, k = m.qweight.shape
        return None if m.gemv and n % 4 == 0 else f"int8 {n} x {k}"
    if isinstance(m, GemvLinear) and m.weight.dtype == torch.bfloat16:
        n, k = m.weight.shape
        return None if n % 4 == 0 and k % 32 == 0 else f"bf16 {n} x {k}"
    return f"{type(m).__name__} has no C++ format"


def _bias(m):
    return torch.Tensor() if m.bias is None else m.bias.to(torch.bfloat16).contiguous()


def _codes(m: Int4Linear, direct: bool = True) -> torch.Tensor:
    """Int4Linear's 4-bit codes (N, K), 0..15, out of aten's packed layout: read directly
    (decode_step.cpp's int4pack_codes) and checked against aten's own kernel on one input; where that
    read does not hold (another torch), read back through aten's kernel: an identity input with every
    scale 1 and zero 0 gives q - 8 exactly (small integers are exact in bf16), a K x K product."""
    G, N, _ = m.scales_zeros.shape
    K = G * Int4Linear.GROUP
    unit = torch.stack([torch.ones(G, N), torch.zeros(G, N)], -1).to(torch.bfloat16)
    if direct and N % 64 == 0 and tuple(m.qweight.shape) == (N, K // 2) and m.qweight.dtype == torch.uint8:
        q = torch.ops.pocketlm.int4pack_codes(m.qweight.contiguous(), N, K)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.qweight, Int4Linear.GROUP, unit).float()[:, :64]
        got = x.float() @ (q[:64].float() - 8).t()  # (the first 64 rows: one whole block of the layout)
        if torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
            return q
    eye = torch.eye(K, dtype=torch.bfloat16)
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, m.qweight, Int4Linear.GROUP, unit).t().float() + 8
    return q.round().to(torch.uint8).contiguous()


def _q4(m: Int4Linear) -> list[torch.Tensor]:
    """Int4Linear's codes (decode_step.cpp's Q4_LAYOUT), fp16 scales and mins (w = q * s + min: a Q4
    block's own d and m, not aten's bf16 scales_zeros)."""
    return [torch.ops.pocketlm.q4_pack(_codes(m)), m.scale16.contiguous(), m.min16.contiguous(), _bias(m)]


def _matrix(m: nn.Module) -> tuple[int, list[torch.Tensor]]:
    if isinstance(m, Int4Linear):
        return Q4, _q4(m)
    if isinstance(m, Int8Linear):
        return INT8, [m.qweight.contiguous(), m.scale.contiguous(), torch.Tensor(), _bias(m)]
    return BF16, [m.weight.contiguous(), torch.Tensor(), torch.Tensor(), _bias(m)]


class CStep:
    """The engine's decode forward: the C++ step for one token per row, the model otherwise."""

    def __init__(self, model: nn.Module, store):
        reason = why_not(model, store)
        if reason:
            raise RuntimeError(f"the C++ decode step cannot run this model: {reason}")
        self.model, cfg = model, model.cfg
        tensors, formats = [], []
        with torch.no_grad():
            for b in model.layers:
                tensors.append(b.attn_norm.weight.detach().float().contiguous())
                for m in _block_linears(b).values():
                    fmt, parts = _matrix(m)
                    formats.append(fmt)
                    tensors += parts
                tensors.append(b.mlp_norm.weight.detach().float().contiguous())
            cos, sin = model._rope_cache
            tensors += [model.norm.weight.detach().float().contiguous(), cos.float().contiguous(), sin.float().contiguous()]
        sizes = [cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd, cfg.intermediate_size]
        self.step = torch.classes.pocketlm.DecodeStep(tensors, sizes + formats, float(model.norm.eps))
        self._lora_stacks = None  # the adapter stacks the step was last given (_sync_lora)

    def runs(self, ids, batch, kwargs) -> bool:
        return (batch is not None and not kwargs and batch.input_embeds is None
                and ids is not None and ids.dim() == 2 and ids.size(1) == 1 and batch.k.size(1) == ids.size(0)
                and (batch.adapter_ids is None or batch.adapter_ids.numel() == ids.size(0)))

    def _sync_lora(self) -> None:
        """Give the step the adapter store's current stacks. Loading or unloading an adapter writes its
        slot in place (the step's pointers see it); only a reallocation (a higher rank, more slots) or
        a projection's first or last adapter changes what it must be given: each RowLoRA then makes a
        new _kernel_stacks tuple, or has none, so the tuples' identities tell (the step keeps them)."""
        mods = [m for b in self.model.layers for m in _block_linears(b, wrapped=True).values()]
        stacks = [m._kernel_stacks() if isinstance(m, RowLoRA) and m.A is not None and m.filled else None
                  for m in mods]
        if self._lora_stacks is not None and all(a is b for a, b in zip(stacks, self._lora_stacks)):
            return
        tensors, ints = [], []
        for st in stacks:
            if st is None:
                ints.append(0)
                continue
            A, Bt, rows, cols = st
            ints.append(len(Bt))
            tensors += [A, *Bt]
            for row, col in zip(rows, cols):
                ints += [row, col]
        self.step.set_lora(tensors, ints)
        self._lora_stacks = stacks

    def __call__(self, ids=None, batch=None, **kwargs):
        if not self.runs(ids, batch, kwargs):
            return self.model(ids, batch=batch, **kwargs)
        n = ids.size(0)
        x = self.model.embed_tokens(ids).reshape(n, -1)
        # (one token per row, each at its own position: a free row's 0, a row waiting for an extend its next)
        slots = torch.Tensor()
        if batch.adapter_ids is not None:
            self._sync_lora()
            slots = batch.adapter_ids.reshape(n).to(torch.long).contiguous()
        self.step.run(x, batch.k, batch.v, batch.positions.reshape(n), slots)
        return self.model.lm_head(x.view(n, 1, -1))


def decoder(model: nn.Module, store):
    """What the engine's decode step calls: a CStep where the C++ step runs, else the model itself."""
    return model if why_not(model, store) else CStep(model, store)


def matvec(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """One of the C++ step's matrix-vector loops alone on an engine linear's weights: x (K,) bf16 ->
    (N,) bf16, without bias (benchmarks/decode_speed.py --kernels times it against aten's)."""
    fmt, (w, s, z, _) = _matrix(linear)
    return torch.ops.pocketlm.step_matvec(x, w, s, z, fmt, w.size(0))
