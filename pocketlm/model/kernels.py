"""Training kernels for CPUs with AMX (C++ in pocketlm/csrc/train_kernels.cpp): attention, GELU, cross-entropy.

Each replaces a part of a bf16 training step that aten and Inductor run far below what this kind of CPU
can do (2 cores; benchmarks/train_kernels.py, figures in BENCHMARKS.md):
- causal attention, forward and backward, at 16 x 4 heads x 256 tokens x 64 dims: aten's CPU flash
  backward takes ~15 ms a layer, the flash forward plus a batched-matmul backward ~11 ms (64 small
  products per matmul at ~0.5 TFLOPS). The kernel keeps one head's score rows in cache and runs every
  product on the AMX tile unit: ~4 ms.
- GELU (tanh form): Inductor's code takes a precise exp and a division per element; a 12-instruction
  exp and a 14-bit reciprocal are enough for bf16 results.
- cross-entropy: the loss and its gradient in one pass over the bf16 logits, with no fp32 copy of them
  and no log-softmax backward.
No library ships these for CPUs, hence the kernels. The model calls them for bf16 steps that need
gradients (`training_attention`, `gelu`, `cross_entropy`); elsewhere, where the CPU lacks AMX or the
build fails, it runs aten's ops. POCKETLM_TRAIN_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from pocketlm import native

BLOCK = 32  # the kernel's block of queries and keys; other lengths are padded up to a multiple


@functools.cache
def available() -> bool:
    """Builds (once per machine) and loads the kernels; False where they cannot run here."""
    if os.environ.get("POCKETLM_TRAIN_KERNELS", "1") == "0" or not (native.has("amx_bf16") and native.has("avx512_bf16")):
        return False
    try:
        native.build("pocketlm_train_kernels", "train_kernels.cpp", native.AMX_FLAGS)
    except Exception as e:  # no compiler, or one without AMX intrinsics: aten's path still works
        warnings.warn(f"training kernels unavailable, using aten's ops ({type(e).__name__}: {e})")
        return False
    if not torch.ops.pocketlm.attn_uses_amx():  # the OS did not grant the tile state
        return False

    def like_out(q):  # (B, H, T, D) laid out as (B, T, H, D), as the kernel writes it
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D).transpose(1, 2)

    torch.library.register_fake("pocketlm::attn_fwd")(
        lambda q, k, v: (like_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
    torch.library.register_fake("pocketlm::attn_bwd")(
        lambda dout, q, k, v, out, lse: (like_out(q), like_out(q), like_out(q)))
    def like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    torch.library.register_fake("pocketlm::gelu_fwd")(like)
    torch.library.register_fake("pocketlm::gelu_bwd")(lambda dy, x: like(x))
    torch.library.register_fake("pocketlm::cross_entropy")(
        lambda logits, targets: (logits.new_empty((), dtype=torch.float32), like(logits)))
    return True


@torch.compiler.assume_constant_result
def kernel_ready() -> bool:  # a constant to torch.compile: builds at trace time, no graph break
    return available()


def on_kernels(x: torch.Tensor) -> bool:
    """Whether x, in a CPU step that needs gradients, goes through the kernels (bf16 only)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_grad_enabled() and kernel_ready()


class AMXAttention(torch.autograd.Function):
    """Causal attention on the AMX kernel: bf16 (B, H, T, D), T and D multiples of BLOCK."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.pocketlm.attn_fwd(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return torch.ops.pocketlm.attn_bwd(dout, *ctx.saved_tensors)


class CausalAttention(torch.autograd.Function):
    """Causal attention for compiled CPU training without the kernel: the fused flash kernel forward,
    and a backward that rebuilds the probabilities from the saved log-sum-exp with batched matmuls.
    Inductor fuses the element-wise part; that runs ~1.8x faster than the CPU flash backward at T=256."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, T = q.size(-1) ** -0.5, q.size(-2)
        p = torch.exp(torch.matmul(q, k.transpose(-1, -2)).float() * scale - lse.unsqueeze(-1))
        p = p.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), 0.0)
        dv = p.to(dout.dtype).transpose(-1, -2) @ dout
        dp = (dout @ v.transpose(-1, -2)).float()
        delta = (dout.float() * out.float()).sum(-1, keepdim=True)
        ds = (p * (dp - delta) * scale).to(q.dtype)
        return ds @ k, ds.transpose(-1, -2) @ q, dv


def amx_attention(q, k, v):
    """AMXAttention for any length: padding keys after every real query changes no causal output."""
    T = q.size(2)
    pad = -T % BLOCK
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out = AMXAttention.apply(q, k, v)
    return out[:, :, :T] if pad else out


def training_attention(q, k, v, kv_repeat: int = 1):
    """Causal attention (B, H, T, D) for a CPU step that needs gradients, or None where SDPA is better.
    kv_repeat: query heads per key/value head (grouped-query attention)."""
    on_kernel = q.size(-1) % BLOCK == 0 and on_kernels(q)
    if not (on_kernel or torch.compiler.is_compiling()):
        return None
    if kv_repeat > 1:
        k, v = k.repeat_interleave(kv_repeat, dim=1), v.repeat_interleave(kv_repeat, dim=1)
    return amx_attention(q, k, v) if on_kernel else CausalAttention.apply(q, k, v)


class GeluKernel(torch.autograd.Function):
    """GPT-2's tanh GELU of bf16 x (numel a multiple of 16)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.pocketlm.gelu_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.ops.pocketlm.gelu_bwd(dy, *ctx.saved_tensors)


class FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bf16 logits (N, V) against targets (N,), -100 ignored; the gradient is
    computed with the loss and only scaled in the backward."""

    @staticmethod
    def forward(ctx, logits, targets):
        loss, grad = torch.ops.pocketlm.cross_entropy(logits, targets)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None
