"""Training kernels for CPUs with AVX512-BF16 (C++ in pocketlm/csrc/train_attention.cpp, train_kernels.cpp):
attention, GELU, cross-entropy.

Each replaces a part of a bf16 training step that aten and Inductor run far below what this kind of CPU
can do (2 cores; benchmarks/train_kernels.py, figures in BENCHMARKS.md):
- causal attention, forward and backward, at 16 x 4 heads x 256 tokens x 64 dims: aten's CPU flash
  backward takes ~15 ms a layer, the flash forward plus a batched-matmul backward ~11 ms (64 small
  products per matmul at ~0.5 TFLOPS). The kernel keeps one head's score rows in cache and runs every
  product as 32 x 32 blocks: on the AMX tile unit where the CPU has one (~4 ms), otherwise with
  AVX512-BF16's vdpbf16ps on the same packed operands.
- GELU (tanh form): Inductor's code takes a precise exp and a division per element; a 12-instruction
  exp and a 14-bit reciprocal are enough for bf16 results.
- cross-entropy: the loss and its gradient in one pass over the bf16 logits, with no fp32 copy of them
  and no log-softmax backward.
No library ships these for CPUs, hence the kernels. The model calls them for bf16 steps that need
gradients (`training_attention`, `gelu`, `cross_entropy`); `choice()` says which each part runs, and
the training loop prints it. Where the CPU lacks AVX512-BF16 (AVX2-only: it trains in fp32) or the build
fails, aten's ops run. POCKETLM_TRAIN_KERNELS=0 turns the kernels off; POCKETLM_AMX=0 keeps them off the
tile unit (the AVX512-BF16 attention runs instead), so an AMX machine also tests that path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from pocketlm import native

BLOCK = 32  # the kernel's block of queries and keys; other lengths are padded up to a multiple
AMX, AVX512, ATEN = "AMX", "AVX512-BF16", "aten"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs each part of a bf16 CPU training step: AMX, AVX512 or ATEN, and why a faster one does not."""
    attention: str
    elementwise: str  # GELU and cross-entropy
    why: str = ""

    def line(self) -> str:
        """The one line `pretrain` and `finetune` print, e.g. 'train: attention via AVX512-BF16 kernels (no
        AMX), GELU and cross-entropy via AVX512-BF16 kernels'."""
        def via(path):
            return "aten" if path == ATEN else f"{path} kernels"
        if self.attention == self.elementwise:
            line = f"train: attention, GELU and cross-entropy via {via(self.attention)}"
        else:
            line = f"train: attention via {via(self.attention)}, GELU and cross-entropy via {via(self.elementwise)}"
        return line + (f" ({self.why})" if self.why else "")


@functools.cache
def _build() -> str | None:
    """Builds (once per machine) and loads the kernels; the error where none could be built."""
    errors = []
    # a compiler too old for the AMX intrinsics (GCC < 11) still builds the AVX512-BF16 half
    for name, extra in (("pocketlm_train_amx", native.AMX_FLAGS), ("pocketlm_train", ["-DPOCKETLM_NO_AMX"])):
        try:
            native.build(name, ["train_attention.cpp", "train_kernels.cpp"], extra)
            break
        except Exception as e:  # noqa: PERF203 (no compiler, or an unusual toolchain: aten's path still works)
            errors.append(f"{type(e).__name__}: {e}")
    else:
        warnings.warn(f"training kernels unavailable, using aten's ops ({errors[-1]})")
        return errors[-1]

    def like_out(q):  # (B, H, T, D) laid out as (B, T, H, D), as the kernel writes it
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D).transpose(1, 2)

    def like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    torch.library.register_fake("pocketlm::attn_fwd")(
        lambda q, k, v, amx: (like_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
    torch.library.register_fake("pocketlm::attn_bwd")(
        lambda dout, q, k, v, out, lse, amx: (like_out(q), like_out(q), like_out(q)))
    torch.library.register_fake("pocketlm::gelu_fwd")(like)
    torch.library.register_fake("pocketlm::gelu_bwd")(lambda dy, x: like(x))
    torch.library.register_fake("pocketlm::cross_entropy")(
        lambda logits, targets: (logits.new_empty((), dtype=torch.float32), like(logits)))
    return None


@functools.cache
def choice() -> Choice:
    """Which path each part takes here, from the CPU's features and the environment (read once;
    choice.cache_clear() reads them again)."""
    if os.environ.get("POCKETLM_TRAIN_KERNELS", "1") == "0":
        return Choice(ATEN, ATEN, "POCKETLM_TRAIN_KERNELS=0")
    if not native.has("avx512_bf16"):
        return Choice(ATEN, ATEN, "no AVX512-BF16")
    error = _build()
    if error is not None:
        return Choice(ATEN, ATEN, "kernel build failed")
    if not native.has("amx_bf16"):
        why = "no AMX"
    elif os.environ.get("POCKETLM_AMX", "1") == "0":
        why = "POCKETLM_AMX=0"
    elif not torch.ops.pocketlm.amx_granted():  # asked only here: the tile-state request needs AMX
        why = "no AMX tile state: not granted by the OS, or a build without AMX"
    else:
        return Choice(AMX, AVX512)
    # without AMX the vdpbf16ps attention still beats aten's: 4.2x the compiled fallback on a Zen 5
    # (benchmarks/train_kernels.py)
    return Choice(AVX512, AVX512, why)


def available() -> bool:
    """Whether any training kernel runs here (built and loaded)."""
    return choice().elementwise != ATEN


# constants to torch.compile: they build at trace time, no graph break
@torch.compiler.assume_constant_result
def kernel_ready() -> bool:
    return choice().elementwise != ATEN


@torch.compiler.assume_constant_result
def attention_ready() -> bool:
    return choice().attention != ATEN


@torch.compiler.assume_constant_result
def attention_on_amx() -> bool:
    return choice().attention == AMX


def in_step(x: torch.Tensor) -> bool:
    """Whether x belongs to a bf16 CPU step that needs gradients: where the kernels apply."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_grad_enabled()


def on_kernels(x: torch.Tensor) -> bool:
    """Whether x, in a CPU step that needs gradients, goes through the GELU and cross-entropy kernels."""
    return in_step(x) and kernel_ready()


class KernelAttention(torch.autograd.Function):
    """Causal attention on the kernel: bf16 (B, H, T, D), T and D multiples of BLOCK; amx: on the tile unit."""

    @staticmethod
    def forward(ctx, q, k, v, amx):
        out, lse = torch.ops.pocketlm.attn_fwd(q, k, v, amx)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.amx = amx
        return out

    @staticmethod
    def backward(ctx, dout):
        return *torch.ops.pocketlm.attn_bwd(dout, *ctx.saved_tensors, ctx.amx), None


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


def kernel_attention(q, k, v, amx: bool | None = None):
    """KernelAttention for any length: padding keys after every real query changes no causal output.
    amx: on the tile unit or not (default: as choice() says)."""
    T = q.size(2)
    pad = -T % BLOCK
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out = KernelAttention.apply(q, k, v, attention_on_amx() if amx is None else amx)
    return out[:, :, :T] if pad else out


def training_attention(q, k, v, kv_repeat: int = 1):
    """Causal attention (B, H, T, D) for a CPU step that needs gradients, or None where SDPA is better.
    kv_repeat: query heads per key/value head (grouped-query attention)."""
    on_kernel = q.size(-1) % BLOCK == 0 and in_step(q) and attention_ready()
    if not (on_kernel or torch.compiler.is_compiling()):
        return None
    if kv_repeat > 1:
        k, v = k.repeat_interleave(kv_repeat, dim=1), v.repeat_interleave(kv_repeat, dim=1)
    return kernel_attention(q, k, v) if on_kernel else CausalAttention.apply(q, k, v)


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
