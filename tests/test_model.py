import pytest
import torch

from reference import generate

from pocketlm.infer.batch import KVStore
from pocketlm.model.gpt import GPT, ModelConfig, gelu_tanh
from pocketlm.model.kernels import CausalAttention


@pytest.mark.parametrize("arch,kv", [("gpt2", None), ("llama", 2), ("llama", 1)])
def test_kv_cache_generation_equals_cacheless(arch, kv):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=97, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, block_size=64,
                      qkv_bias=arch == "llama")
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 97, (1, 7))
    with_cache = generate(model, prompt, 30, use_cache=True)
    without = generate(model, prompt, 30, use_cache=False)
    assert torch.equal(with_cache, without)


def test_rows_of_a_batched_cache_advance_independently():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=64)
    model = GPT(cfg).eval()
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 4))
    store = KVStore(cfg, 2, 32)
    # row 0 prefills 5 tokens, row 1 prefills 4; then one step decodes a token in each, from different positions
    model(a[:, :5], batch=store.step(0, 1, a[:, :5]))
    model(b, batch=store.step(1, 2, b))
    step = torch.cat([a[:, 5:6], a[:, 0:1]])
    logits = model(step, batch=store.step(0, 2, step))
    assert torch.allclose(logits[0, -1], model(a[:, :6])[0, -1], atol=1e-5)
    assert torch.allclose(logits[1, -1], model(torch.cat([b, a[:, 0:1]], 1))[0, -1], atol=1e-5)
    assert store.lengths == [6, 5]


def test_param_count_and_flops():
    cfg = ModelConfig(arch="gpt2", vocab_size=100, n_layer=2, n_head=2, n_embd=16, block_size=8)
    model = GPT(cfg)
    per_layer = 4 * (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16) + 2 * 2 * 16
    assert model.num_params() == 2 * per_layer + 2 * 16
    assert model.flops_per_token(8) == 6 * (model.num_params() + 100 * 16) + 12 * 2 * 16 * 8
    # frozen (as under LoRA): no weight gradients, so 4 FLOPs per weight per token instead of 6
    model.requires_grad_(False)
    assert model.flops_per_token(8) == 4 * (model.num_params() + 100 * 16) + 12 * 2 * 16 * 8


@pytest.mark.parametrize("kwargs,match", [({"arch": "bert"}, "arch"), ({"n_head": 4, "n_kv_head": 3}, "multiple"),
                                          ({"dropout": 1.5}, "dropout")])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    x = torch.randint(0, 50, (2, 8))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_rows_equal_separate_examples(arch):
    """Two examples packed in one row with doc_ids give the logits each gives alone: no attention
    across the boundary, positions restart at the second example."""
    torch.manual_seed(0)
    kv = 2 if arch == "llama" else None
    m = GPT(ModelConfig(arch=arch, vocab_size=100, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, block_size=32)).eval()
    a, b = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 7))
    packed = m(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 5 + [1] * 7]))
    torch.testing.assert_close(packed[:, :5], m(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:], m(b), atol=1e-5, rtol=0)
    unpacked = m(torch.cat([a, b], 1))
    assert not torch.allclose(unpacked[:, 5:], m(b), atol=1e-3)  # without doc_ids the second example sees the first


def test_causal_attention_backward_matches_sdpa():
    """The compiled-training attention (flash forward, matmul backward) has SDPA's values and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 37, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = CausalAttention.apply(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gelu_forms_agree():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    compiled = torch.compile(gelu_tanh, backend="eager")(x)  # takes the sigmoid form
    torch.testing.assert_close(compiled, torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch,kv", [("gpt2", 4), ("llama", 2)])
def test_compiled_training_path_matches_eager(arch, kv):
    """Traced (what torch.compile sees: the matmul attention backward, the sigmoid GELU),
    the loss and every gradient equal the eager model's."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(arch=arch, vocab_size=100, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, block_size=32))
    x = torch.randint(0, 100, (2, 12))
    grads = []
    for forward in (m, torch.compile(m, backend="eager")):
        m.zero_grad()
        loss = forward(x, x)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_dropout_can_be_set_apart():
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.2)
    assert cfg.attention_dropout == 0.2  # follows dropout unless set
    assert ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.2, attn_dropout=0.0).attention_dropout == 0.0
    with pytest.raises(ValueError, match="attn_dropout"):
        ModelConfig(attn_dropout=1.5)
