"""The CPU training kernels (pocketlm/csrc/train_kernels.cpp) against aten: values and gradients."""

import os

import pytest
import torch
import torch.nn.functional as F

from pocketlm import native
from pocketlm.model import kernels
from pocketlm.model.gpt import GPT, ModelConfig

# the kernels need AMX and AVX512-BF16; where the CPU has them, a failed build fails these tests
pytestmark = pytest.mark.skipif(not (native.has("amx_bf16") and native.has("avx512_bf16"))
                                or os.environ.get("POCKETLM_TRAIN_KERNELS") == "0",
                                reason="no AMX / AVX512-BF16 here, or POCKETLM_TRAIN_KERNELS=0 (the model runs aten's ops)")


def heads(B, T, H, D, seed):
    """(B, H, T, D) bf16 laid out as (B, T, H, D), as the model's q/k/v projections produce them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)


@pytest.mark.parametrize("T,D", [(32, 32), (77, 64), (256, 64), (96, 128)])
def test_attention_kernel_is_as_close_to_fp32_as_aten_bf16(T, D):
    assert kernels.available()
    q, k, v, g = (heads(2, T, 3, D, s) for s in range(4))
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    results = {}
    for name, fn in (("kernel", kernels.amx_attention),
                     ("aten", lambda *x: F.scaled_dot_product_attention(*x, is_causal=True))):
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*ins)
        results[name] = [out, *torch.autograd.grad(out, ins, g)]
    for i, want in enumerate([ref, *ref_grads]):
        err = {n: (r[i].float() - want).abs().max().item() for n, r in results.items()}
        assert err["kernel"] <= 2 * err["aten"] + 1e-3, (i, err)


def test_gelu_kernel_matches_the_tanh_form_and_its_derivative():
    assert kernels.available()
    x = torch.linspace(-20, 20, 4096, dtype=torch.float64).to(torch.bfloat16).view(64, 64)
    dy = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    xr = x.double().requires_grad_()
    want = F.gelu(xr, approximate="tanh")
    (want_dx,) = torch.autograd.grad(want, xr, dy.double())
    xk = x.clone().requires_grad_()
    y = kernels.GeluKernel.apply(xk)
    (dx,) = torch.autograd.grad(y, xk, dy)
    bf16_step = 2 ** -8  # relative rounding of a bf16 result
    assert ((y.double() - want).abs() <= 2 * bf16_step * want.abs() + 1e-6).all()
    assert ((dx.double() - want_dx).abs() <= 4 * bf16_step * want_dx.abs() + 2e-3).all()


def test_cross_entropy_kernel_matches_aten_with_ignored_targets():
    assert kernels.available()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 160, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 160, (50,), generator=gen)
    targets[::3] = -100
    a = logits.clone().requires_grad_()
    loss = kernels.FusedCrossEntropy.apply(a, targets)
    (loss * 3).backward()
    b = logits.float().requires_grad_()
    want = F.cross_entropy(b, targets, ignore_index=-100)
    (want * 3).backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-4)
    assert (a.grad[::3] == 0).all()
    targets[4] = 160
    with pytest.raises(RuntimeError, match="target 160 at row 4"):
        kernels.FusedCrossEntropy.apply(logits, targets)


@pytest.mark.parametrize("arch,kv", [("gpt2", 4), ("llama", 2)])
def test_bf16_training_step_on_the_kernels_matches_aten(arch, kv, monkeypatch):
    """The model's bf16 training path through the kernels (traced by torch.compile, as `pretrain` runs it)
    gives the loss and gradients that aten's path gives."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(arch=arch, vocab_size=128, n_layer=2, n_head=4, n_kv_head=kv, n_embd=128, block_size=64))
    x = torch.randint(0, 128, (2, 50))

    def step(forward):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(x, x)[1]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])

    assert kernels.available()
    torch._dynamo.reset()
    with torch.profiler.profile() as prof:
        kernel_loss, kernel_grads = step(torch.compile(m, backend="aot_eager"))
    ran = {e.name for e in prof.events() if e.name.startswith("pocketlm::")}
    want = {"attn_fwd", "attn_bwd", "cross_entropy"} | ({"gelu_fwd", "gelu_bwd"} if arch == "gpt2" else set())
    assert ran == {f"pocketlm::{n}" for n in want}
    monkeypatch.setattr(kernels, "kernel_ready", lambda: False)  # what on_kernels asks: the model runs aten's ops
    with torch.profiler.profile() as prof:
        aten_loss, aten_grads = step(m)
    assert not any(e.name.startswith("pocketlm::") for e in prof.events())  # aten alone, not the kernels again
    torch.testing.assert_close(kernel_loss, aten_loss, rtol=1e-2, atol=1e-2)
    cos = F.cosine_similarity(kernel_grads.float(), aten_grads.float(), dim=0)
    assert cos > 0.999, cos
