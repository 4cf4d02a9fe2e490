"""The faithful default precision (--dtype auto) and the kernel fallbacks: a GGUF file's Q4_0/Q4_1
blocks come back exactly in int4, Q8_0's and full-precision weights run group-wise int8 (int8g), and
every precision still matches fp32 with each hand-written or vendor fast path forced off."""

import numpy as np
import pytest
import torch
from test_fused import IDS, run  # a prefill and decode steps, as the engine runs them
from tiny_lm import tiny_lm

import pocketlm.infer.gemv as gemv_module
import pocketlm.infer.linears as linears_module
from pocketlm import native
from pocketlm.infer.fused import ACTIVATIONS, inference_copy
from pocketlm.infer.generate import faithful_precision, load_engine
from pocketlm.infer.linears import Int4Linear, Int8GroupLinear, describe

gguf = pytest.importorskip("gguf")


def file_weights(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w stored as a GGUF block type and read back with the gguf package's own dequantization."""
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(w.numpy(), kind)
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, kind), np.float32).reshape(w.shape).copy())


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from pocketlm.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_dir)


W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_holds_q4_blocks_exactly(qtype):
    w = file_weights(W, qtype)
    lin = Int4Linear(w, None)
    got = lin(torch.eye(128, dtype=torch.bfloat16)).float().t()  # each column: one input's weights
    step = (w.view(64, 4, 32).amax(-1) - w.view(64, 4, 32).amin(-1)) / 15  # the block's d (Q4_0: <= 15/16 of it)
    err = (got - w).abs().view(64, 4, 32).amax(-1)
    # the file's own 4-bit code in every place: off by a code would be >= a step; what remains is the
    # bf16 rounding of scale, zero and output
    assert (err < step / 4).all(), (err / step).max()
    rtn = Int4Linear(W, None)(torch.eye(128, dtype=torch.bfloat16)).float().t()  # the unquantized weights: not exact
    assert ((rtn - W).abs().view(64, 4, 32).amax(-1) > step / 4).any()


def test_int8g_is_its_dequantized_weights_and_q8_0_exactly():
    w = file_weights(W, "Q8_0")
    lin = Int8GroupLinear(w, torch.randn(64))
    assert torch.equal(lin.dequantized(), w)  # Q8_0's scale is each block's max |w| / 127, recomputed exactly
    assert lin.zero is None  # every block symmetric: the decode path adds no zero term
    assert torch.equal(lin.rows(torch.tensor([[3, 7], [0, 63]])), w[[3, 7, 0, 63]].view(2, 2, 128))
    lossy = Int8GroupLinear(W, None).dequantized()
    assert (lossy - W).abs().max() <= W.abs().max() / 127 / 2 + 1e-6
    for rows in (1, 5, 40):  # decode (batched matmul over groups) and prefill (dequantized once)
        x = torch.randn(rows, 128).bfloat16()
        want = x.float() @ w.t() + lin.bias.float()
        torch.testing.assert_close(lin(x).float(), want, atol=0.05, rtol=0.01)  # bf16 output only


def test_int8g_holds_q4_1_blocks_to_fp32_rounding():
    """A Q4_1 block's 16 levels are 17 int8 codes apart between its min and max: int8g's min/max fit
    holds them (a symmetric Q8_0 fit alone is off by up to half its step, max |w| / 254, which cost
    SmolLM2's Q4_1 weights ~1.5 points of top-1 against fp32: BENCHMARKS.md, "int8g"), and the
    kernels compute with them: the decode path (batched matmul over groups, scales and zeros after)
    and the many-row one agree with fp32 of the file's weights to the bf16 rounding of the output."""
    w = file_weights(W * 0.05 + 0.02, "Q4_1")  # weights leaning to one side, as many real groups do
    lin = Int8GroupLinear(w, None)
    assert (lin.dequantized() - w).abs().max() <= 1e-6 * w.abs().max()
    assert torch.equal(lin.rows(torch.tensor([5, 9])), lin.dequantized()[[5, 9]])
    g = torch.Generator().manual_seed(2)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 128, generator=g).bfloat16()
        want = x.float() @ w.t()
        got = lin(x).float()
        assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-5).all(), ((got - want).abs() / want.abs()).max()
    # full-precision weights: never a coarser step than the symmetric fit's
    err = (Int8GroupLinear(W, None).dequantized() - W).abs().view(64, 4, 32).amax(-1)
    assert (err <= W.abs().view(64, 4, 32).amax(-1) / 254 * (1 + 1e-5)).all()


@pytest.mark.parametrize("qtype,want", [("F32", "int8g"), ("F16", "int8g"), ("Q8_0", "int8g"),
                                        ("Q4_0", "int4"), ("Q4_1", "int4")])
def test_auto_follows_the_gguf_block_type(qtype, want, tok, tmp_path, capsys):
    from tiny_hf import make_hf_model, write_gguf

    from pocketlm.model import load_model

    file = write_gguf(make_hf_model("llama", tok.vocab_size), tok, tmp_path / "m.gguf", qtype)
    model, _ = load_model(file)
    assert model.source_quant == qtype
    assert faithful_precision(model) == want
    assert faithful_precision(model, adapter="some-lora") == "int8g"  # merged weights are not the file's blocks
    engine = load_engine(file)
    assert engine.precision == want
    line, step = capsys.readouterr().err.strip().splitlines()[-2:]
    assert line.startswith(f"decode: {want[:4]}") and "CPU" in line
    assert step.startswith("decode: one stream's step")  # the C++ step, or why not
    assert (f"the file's {qtype} weights" in line) == (qtype not in ("F32", "F16"))
    assert load_engine(file, dtype="int8").precision == "int8"  # explicit precisions still work


def test_auto_for_a_full_precision_checkpoint():
    model, _ = tiny_lm("llama")
    assert not hasattr(model, "source_quant") and faithful_precision(model) == "int8g"


@pytest.mark.parametrize("forced", ["kernels-off", "amx-off", "onednn-off"])
def test_each_fallback_matches_fp32(forced, monkeypatch):
    if forced == "kernels-off":
        monkeypatch.setenv("POCKETLM_KERNELS", "0")
        assert not gemv_module.available() and "off: POCKETLM_KERNELS=0" in describe("bf16")
    elif forced == "amx-off":  # a CPU without AMX: the kernels' one-row AVX512 half, or none
        has = native.has
        monkeypatch.setattr(native, "has", lambda flag: not flag.startswith("amx") and has(flag))
        monkeypatch.setattr(gemv_module, "uses_amx", lambda: False)
    else:  # no oneDNN bf16 (AVX2-only CPUs)
        monkeypatch.setattr(linears_module, "onednn_bf16", lambda: False)
    model, _ = tiny_lm("llama")
    with torch.inference_mode():
        want = run(model, IDS, 3, torch.float32)
        spread = want.std().item()
        for precision, tolerance in (("bf16", 0.05), ("int8", 0.05), ("int8g", 0.03), ("int4", 0.25)):
            got = run(inference_copy(model, precision), IDS, 3, ACTIVATIONS[precision])
            assert (got - want).abs().max() < tolerance * spread, (precision, (got - want).abs().max(), spread)


@pytest.mark.parametrize("precision", ["int8", "int8g", "int4"])
def test_a_long_prefill_through_the_bf16_copy_matches_the_quantized_kernels(precision, monkeypatch):
    """A prompt of DENSE_ROWS rows or more multiplies by a bf16 copy of the quantized weights
    (oneDNN): its logits stay as close to fp32 as the weight-only kernels' do, and the switch turns it off."""
    if not linears_module.onednn_bf16():
        pytest.skip("no native oneDNN bf16 matmul on this CPU: quantized linears keep no bf16 copy")
    model, _ = tiny_lm("llama")
    ids = torch.randint(0, 384, (2, linears_module.DENSE_ROWS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = run(model, ids, 2, torch.float32)
        spread = want.std().item()
        got = {}
        for on in ("1", "0"):
            monkeypatch.setenv("POCKETLM_DENSE_PREFILL", on)
            copy = inference_copy(model, precision)
            has_copy = [m.prefill is not None for m in copy.modules() if hasattr(m, "prefill")]
            assert has_copy and all(has_copy) == (on == "1") and any(has_copy) == (on == "1")
            got[on] = run(copy, ids, 2, ACTIVATIONS[precision])
        tolerance = 0.25 if precision == "int4" else 0.05
        for on, logits in got.items():
            assert (logits - want).abs().max() < tolerance * spread, (on, (logits - want).abs().max(), spread)
        # the same quantized weights either way: the two paths differ by bf16 rounding, not by quantization
        assert (got["1"] - got["0"]).abs().max() < 0.05 * spread


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_keeps_q4_blocks_fp16_scales_exactly(qtype):
    """The fp16 scales and mins the C++ step reads give back a Q4 file's weights bit for bit (aten's
    bf16 scales_zeros cannot: 3 mantissa bits short of the file's fp16 d and m)."""
    from pocketlm.infer import cstep

    w = file_weights(W, qtype)
    lin = Int4Linear(w, None)
    q = cstep._codes(lin, direct=False).float().view(64, 4, 32)  # (through aten's kernel: no C++ needed)
    assert lin.scale16.dtype == lin.min16.dtype == torch.float16
    back = (q * lin.scale16.float()[..., None] + lin.min16.float()[..., None]).view(64, 128)
    assert torch.equal(back, w)
    sz = lin.scales_zeros.float()  # (groups, N, 2): aten's bf16 form of the same values
    assert torch.allclose(sz[..., 0].t(), lin.scale16.float(), rtol=2**-8)


def test_int4_c_step_matches_fp32_of_the_file_weights():
    """One matrix through the C++ step's q4 loop against fp32 of the file's Q4_1 weights: within the
    bf16 rounding of the output (and of x, which both sides share)."""
    from pocketlm.infer import cstep

    if not cstep._built():
        pytest.skip("the C++ step is not built here")
    g = torch.Generator().manual_seed(1)
    w = file_weights(torch.randn(256, 192, generator=g) * 0.05 + 0.02, "Q4_1")  # K % 128 == 64: the tail path too
    lin = Int4Linear(w, None)
    for _ in range(4):
        x = torch.randn(192, generator=g).bfloat16()
        want = x.float() @ w.t()
        got = cstep.matvec(x, lin).float()
        assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-5).all(), ((got - want).abs() / want.abs()).max()


def test_int4_head_refines_from_the_fp32_token_table():
    """A tied int4 head's fast scores are int8 rows; its best candidates are recomputed from the fp32
    token table itself (a Q8_0 file's own values), not the int8 rows."""
    model, _ = tiny_lm()
    if model.lm_head.weight is not model.embed_tokens.weight:
        pytest.skip("an untied head keeps int8 rows")
    copy = inference_copy(model, "int4")
    assert copy.lm_head.rows is copy.embed_tokens.weight and copy.lm_head.rows.dtype == torch.float32
    x = torch.randn(1, 1, model.cfg.n_embd)
    got = copy.lm_head(x)[0, 0]
    want = x[0, 0] @ model.embed_tokens.weight.float().t()
    top = got.topk(4).indices
    assert torch.allclose(got[top], want[top], rtol=1e-5, atol=1e-5)
    assert got.argmax() == want.argmax()
