"""The CPU training kernels (pocketlm/csrc/train_attention.cpp, train_kernels.cpp) against aten: values and
gradients on every path this CPU can run (AMX tiles, AVX512-BF16), and the switches that force each fallback."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from pocketlm import native
from pocketlm.cli import main
from pocketlm.model import kernels
from pocketlm.model.gpt import GPT, ModelConfig

# the kernels need AVX512-BF16; where the CPU has it, a failed build fails these tests
needs_kernels = pytest.mark.skipif(not native.has("avx512_bf16") or os.environ.get("POCKETLM_TRAIN_KERNELS") == "0",
                                   reason="no AVX512-BF16 here, or POCKETLM_TRAIN_KERNELS=0 (the model runs aten's ops)")
# attention's block products: vdpbf16ps everywhere the kernels run, the tile unit too where there is one
ON_AMX = [False] + ([True] if native.has("amx_bf16") else [])


@pytest.fixture
def env(monkeypatch):
    """monkeypatch for the kernels' switches: choice() reads them afresh, and again after the test."""
    kernels.choice.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    kernels.choice.cache_clear()
    torch._dynamo.reset()  # graphs traced with the kernels' choice as a constant


def heads(B, T, H, D, seed):
    """(B, H, T, D) bf16 laid out as (B, T, H, D), as the model's q/k/v projections produce them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("amx", ON_AMX, ids=lambda amx: "amx" if amx else "avx512")
@pytest.mark.parametrize("T,D", [(32, 32), (77, 64), (256, 64), (96, 128)])
def test_attention_kernel_is_as_close_to_fp32_as_aten_bf16(T, D, amx):
    if amx and kernels.choice().attention != kernels.AMX:
        pytest.skip(f"AMX attention is off here: {kernels.choice().why}")
    assert kernels.available()
    q, k, v, g = (heads(2, T, 3, D, s) for s in range(4))
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    results = {}
    for name, fn in (("kernel", lambda *x: kernels.kernel_attention(*x, amx=amx)),
                     ("aten", lambda *x: F.scaled_dot_product_attention(*x, is_causal=True))):
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*ins)
        results[name] = [out, *torch.autograd.grad(out, ins, g)]
    for i, want in enumerate([ref, *ref_grads]):
        err = {n: (r[i].float() - want).abs().max().item() for n, r in results.items()}
        assert err["kernel"] <= 2 * err["aten"] + 1e-3, (i, err)


@needs_kernels
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


@needs_kernels
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


@needs_kernels
@pytest.mark.parametrize("amx", ON_AMX, ids=lambda amx: "amx" if amx else "avx512")
@pytest.mark.parametrize("arch,kv", [("gpt2", 4), ("llama", 2)])
def test_bf16_training_step_on_the_kernels_matches_aten(arch, kv, amx, env):
    """The model's bf16 training path through the kernels (traced by torch.compile, as `pretrain` runs it)
    gives the loss and gradients that aten's path gives, with AMX or (POCKETLM_AMX=0) without."""
    env.setenv("POCKETLM_AMX", "1" if amx else "0")
    choice = kernels.choice()
    if amx and choice.attention != kernels.AMX:
        pytest.skip(f"AMX attention is off here: {choice.why}")
    assert choice.elementwise == kernels.AVX512 and choice.attention in (kernels.AMX if amx else kernels.AVX512, kernels.ATEN)
    torch.manual_seed(0)
    m = GPT(ModelConfig(arch=arch, vocab_size=128, n_layer=2, n_head=4, n_kv_head=kv, n_embd=128, block_size=64))
    x = torch.randint(0, 128, (2, 50))

    def step(forward):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(x, x)[1]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])

    torch._dynamo.reset()
    with torch.profiler.profile() as prof:
        kernel_loss, kernel_grads = step(torch.compile(m, backend="aot_eager"))
    ran = {e.name for e in prof.events() if e.name.startswith("pocketlm::")}
    want = {"cross_entropy"} | ({"gelu_fwd", "gelu_bwd"} if arch == "gpt2" else set())
    want |= {"attn_fwd", "attn_bwd"} if choice.attention != kernels.ATEN else set()
    assert ran == {f"pocketlm::{n}" for n in want}
    env.setenv("POCKETLM_TRAIN_KERNELS", "0")  # the model runs aten's ops
    kernels.choice.cache_clear()
    with torch.profiler.profile() as prof:
        aten_loss, aten_grads = step(m)
    assert not any(e.name.startswith("pocketlm::") for e in prof.events())  # aten alone, not the kernels again
    torch.testing.assert_close(kernel_loss, aten_loss, rtol=1e-2, atol=1e-2)
    cos = F.cosine_similarity(kernel_grads.float(), aten_grads.float(), dim=0)
    assert cos > 0.999, cos


def test_a_cpu_without_avx512_bf16_runs_aten_alone(env):
    """An AVX2-only CPU (its flags stood in for here): no build, no tile-state request, aten's ops."""
    env.delenv("POCKETLM_TRAIN_KERNELS", raising=False)  # the CPU's flags decide here, not a switch
    env.setattr(native, "has", lambda flag: flag not in ("avx512_bf16", "amx_bf16"))
    env.setattr(kernels, "_build", lambda: pytest.fail("built the kernels on a CPU without AVX512-BF16"))
    assert kernels.choice() == kernels.Choice(kernels.ATEN, kernels.ATEN, "no AVX512-BF16")
    assert kernels.choice().line() == "train: attention, GELU and cross-entropy via aten (no AVX512-BF16)"
    torch.manual_seed(0)
    m = GPT(ModelConfig(arch="gpt2", vocab_size=128, n_layer=1, n_head=2, n_embd=64, block_size=64))
    x = torch.randint(0, 128, (2, 64))
    with torch.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x, x)[1]
        loss.backward()
    assert torch.isfinite(loss) and not any(e.name.startswith("pocketlm::") for e in prof.events())


@pytest.mark.parametrize("switch", ["none", "POCKETLM_AMX=0", "POCKETLM_TRAIN_KERNELS=0"])
def test_pretrain_prints_the_kernels_it_runs_once(switch, env, data_dir, tmp_path, capsys):
    """`pretrain` says which path each part of the step takes; each switch forces its fallback, and an
    AVX2-only CPU trains in fp32 on aten's ops."""
    env.delenv("POCKETLM_AMX", raising=False)
    env.delenv("POCKETLM_TRAIN_KERNELS", raising=False)
    if switch != "none":
        env.setenv(*switch.split("="))
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY,
                 "--train.dtype=bf16"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train:")]
    choice = kernels.choice()
    if not native.has("avx512_bf16"):  # the loop's fp32 note instead: no bf16 step, no kernels to name
        assert lines == [] and choice.attention == choice.elementwise == kernels.ATEN
        return
    assert lines == [choice.line()]
    if switch == "POCKETLM_TRAIN_KERNELS=0":
        assert lines[0] == "train: attention, GELU and cross-entropy via aten (POCKETLM_TRAIN_KERNELS=0)"
        assert not kernels.available()
    elif switch == "POCKETLM_AMX=0" or not native.has("amx_bf16"):
        assert choice.attention != kernels.AMX and choice.elementwise == kernels.AVX512
        assert "GELU and cross-entropy via AVX512-BF16 kernels" in lines[0]
        assert ("POCKETLM_AMX=0" if native.has("amx_bf16") else "no AMX") in choice.why
    else:
        assert choice.attention == kernels.AMX or "tile state" in choice.why
