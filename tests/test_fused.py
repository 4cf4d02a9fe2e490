"""The engine's model (pocketlm/infer/fused.py): the GPT class itself with fused projections and
per-precision kernels swapped in, giving the GPT's own logits in fp32; bf16 and int8 stay close to them
with fp32 logits, and int8 is exactly its dequantized weights."""

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import tiny_lm

import pocketlm.infer.linears as linears_module
from pocketlm.infer.batch import KVStore
from pocketlm.infer.fused import PRECISIONS, REFINED, Head, inference_copy, weight_bytes_per_token
from pocketlm.infer.gemv import available as gemv_available
from pocketlm.infer.linears import GemvLinear, Int4Linear, Int8Linear
from pocketlm.model.gpt import GPT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(model, ids, steps, dtype):
    """Logits of a prefill of two rows then `steps` batched decode steps, each step fed the argmax."""
    store = KVStore(model.cfg, ids.size(0), 64, dtype=dtype)
    out = [model(ids, batch=store.step(0, ids.size(0), ids))[:, -1]]
    for _ in range(steps):
        nxt = out[-1].argmax(-1, keepdim=True)
        out.append(model(nxt, batch=store.step(0, ids.size(0), nxt))[:, -1])
    return torch.stack(out, 1)


IDS = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_is_the_model_itself(arch):
    model, _ = tiny_lm(arch)
    with torch.inference_mode():
        want = run(model, IDS, 4, torch.float32)
        got = run(inference_copy(model, "fp32"), IDS, 4, torch.float32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("precision", ["bf16", "bf16-onednn", "int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lower_precisions_stay_close_with_fp32_logits(arch, precision, monkeypatch):
    model, _ = tiny_lm(arch)
    fallback = precision == "bf16-onednn"
    if fallback:  # a CPU without AVX512-BF16, or no compiler: oneDNN's prepacked weights
        monkeypatch.setattr(linears_module, "gemv_available", lambda: False)
        precision = "bf16"
    with torch.inference_mode():
        want = run(model, IDS, 4, torch.float32)
        fused = inference_copy(model, precision)
        got = run(fused, IDS, 4, torch.bfloat16)
    assert got.dtype == torch.float32
    spread = want.std().item()
    tolerance = {"bf16": 0.05, "int8": 0.05, "int4": 0.25}[precision]  # 4 bits: 16 levels per group of 32
    assert (got - want).abs().max() < tolerance * spread, ((got - want).abs().max(), spread)
    assert weight_bytes_per_token(fused) < weight_bytes_per_token(inference_copy(model, "fp32"))
    if precision == "bf16":
        kinds = {type(m).__name__ for m in fused.modules()} & {"GemvLinear", "PackedLinear"}
        packed = {"PackedLinear"} if linears_module.onednn_bf16() else set()  # AVX2-only CPUs: plain bf16 matmuls
        assert kinds == (packed if fallback or not gemv_available() else {"GemvLinear"})
    assert next(model.parameters()).dtype == torch.float32  # the model it was built from is untouched
    assert type(fused) is GPT and type(fused).forward is GPT.forward  # one forward: a GPT with modules swapped


def test_int8_linear_is_its_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    lin = Int8Linear(w, b)
    dequant = lin.rows(torch.arange(48))
    assert (dequant - w).abs().max() <= dequant.abs().max() / 127  # half a step, plus bf16 scales
    assert lin.qweight.abs().max() == 127  # each row's largest weight uses the full range
    x = torch.randn(3, 5, 32, generator=g).bfloat16()
    want = F.linear(x.float(), dequant, b.bfloat16().float())
    assert torch.allclose(lin(x).float(), want, rtol=2**-7, atol=1e-2)


def test_int4_linear_gives_back_q4_1_weights():
    """Weights as GGUF's Q4_1 stores them (each block of 32 is min + step * 0..15, with both ends
    used) come back exactly; other weights are rounded to the nearest of their group's 16 levels."""
    g = torch.Generator().manual_seed(0)
    step = (torch.rand(48, 2, 1, generator=g) * 0.1 + 0.01).bfloat16().float()
    low = (-8 * step + torch.randn(48, 2, 1, generator=g) * 0.01).bfloat16().float()
    levels = torch.randint(0, 16, (48, 2, 32), generator=g)
    levels[..., 0], levels[..., 1] = 0, 15
    w = (low + step * levels).view(48, 64)
    x = torch.randn(3, 64, generator=g).bfloat16()
    want = F.linear(x.float(), w)
    assert torch.allclose(Int4Linear(w, None)(x).float(), want, rtol=2**-7, atol=2e-2)
    noisy = w + torch.randn(48, 64, generator=g) * 0.004
    err = (Int4Linear(noisy, None)(x).float() - F.linear(x.float(), noisy)).abs().max()
    assert 2e-2 < err < 0.5  # rounding shows, within half a level per weight


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_head_gives_fp32_logits_for_its_best_candidates(precision):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 64, generator=g) * 0.5
    x = torch.randn(2, 1, 64, generator=g).bfloat16()
    head = Head(w, precision)
    weights = head.fast.rows(torch.arange(3000)) if precision == "int8" else w.bfloat16().float()
    want = x.float() @ weights.T  # an fp32 head over the same weights
    got = head(x)
    assert got.dtype == torch.float32
    top = want.topk(REFINED // 2, dim=-1).indices  # surely among the fast kernel's best REFINED
    assert torch.allclose(got.gather(-1, top), want.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert (head.fast(x).float() - want).gather(-1, top).abs().max() > 1e-3  # the fast kernel alone rounds them
    assert (got - want).abs().max() <= want.abs().max() * 2**-8  # the rest: within bf16 rounding


def test_unknown_precision_is_an_error():
    model, _ = tiny_lm()
    with pytest.raises(ValueError, match="precision"):
        inference_copy(model, "fp8")
    assert PRECISIONS == ("fp32", "bf16", "int8", "int8g", "int4")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 9, 16, 17])
@pytest.mark.parametrize("n_out, n_in, bias", [(103, 96, True), (50, 64, False)])
@pytest.mark.parametrize("precision", ["bf16", "fp32", "int8"])
def test_decode_kernel_equals_a_matmul_of_the_same_numbers(rows, n_out, n_in, bias, precision):
    """The decode kernels (or aten past 16 rows): fp32 sums of the products, one rounding to the output
    dtype. One row runs the AVX512 loop (weight rows in groups of 4 plus a tail), 2..16 bf16 and int8 rows
    the AMX tiles where the CPU has them (blocks of 4, 2 and 1 x 16 weight rows, the rest on AVX512)."""
    if not gemv_available():
        pytest.skip("this CPU has no AVX512-BF16 (or no C++ compiler)")
    torch.manual_seed(0)
    w, x = torch.randn(n_out, n_in), torch.randn(1, rows, n_in)
    b = torch.randn(n_out) if bias else None
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    lin = Int8Linear(w, b) if precision == "int8" else GemvLinear(w, b, dtype)
    weights = lin.rows(torch.arange(n_out)).double() if precision == "int8" else w.to(dtype).double()
    want = x.to(dtype).double() @ weights.t() + (b.to(dtype).double() if bias else 0)
    got = lin(x)
    assert got.shape == (1, rows, n_out) and got.dtype == dtype
    tol = 1e-6 if precision == "fp32" else 2**-8 if rows <= 16 else 2**-7  # (aten rounds, then adds the bias)
    assert (got.double() - want).abs().max() <= want.abs().max() * tol
