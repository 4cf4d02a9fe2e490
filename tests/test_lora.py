"""LoRA: injection, merge equivalence, PEFT-format save/load, interoperability with peft, the merge verb."""

import json

import pytest
import torch

from pocketlm.cli import main
from pocketlm.model import GPT, ModelConfig, load_model, save_checkpoint
from pocketlm.model.lora import (AdapterError, LoRALinear, add_lora, apply_adapter, load_adapter_weights,
                                 load_model_with_adapter, lora_modules, merge_lora, save_adapter)
from pocketlm.tokenizer import Tokenizer


def tiny(arch="llama", **kw):
    torch.manual_seed(0)
    cfg = dict(arch=arch, vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=32, tie_embeddings=arch == "gpt2")
    if arch == "llama":
        cfg.update(n_kv_head=2, tie_embeddings=False)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def randomize(model):
    """LoRA B starts at zero (a no-op); give every adapter a nonzero update so the tests can fail."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def clone(model):
    other = GPT(model.cfg).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return other


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_trains_only_lora_and_merge_is_equivalent(arch):
    model = tiny(arch)
    base_logits = model(IDS)
    add_lora(model, rank=4, alpha=8, targets="all")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    per_layer = 7 if arch == "llama" else 6  # gpt2 has no gate_proj
    assert len(lora_modules(model)) == per_layer * 2
    assert torch.allclose(model(IDS), base_logits)  # B = 0: the adapter starts as a no-op
    randomize(model)
    adapted = model(IDS)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merge_lora(model)
    assert not lora_modules(model)
    assert torch.allclose(model(IDS), adapted, atol=1e-5)


@pytest.mark.parametrize("arch,targets", [("llama", "q_proj,v_proj"), ("llama", "all"), ("gpt2", "q_proj,v_proj,down_proj"),
                                          ("gpt2", "all")])
def test_save_then_load_gives_the_same_logits(arch, targets, tmp_path):
    model = tiny(arch)
    base = clone(model)
    add_lora(model, rank=4, alpha=16, targets=targets)
    randomize(model)
    want = model(IDS)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    unmerged = apply_adapter(clone(base), tmp_path / "ad", merge=False)
    assert sorted(lora_modules(unmerged)) == sorted(lora_modules(model))
    assert torch.allclose(unmerged(IDS), want, atol=1e-5)
    merged = apply_adapter(clone(base), tmp_path / "ad")
    assert not lora_modules(merged)
    assert torch.allclose(merged(IDS), want, atol=1e-5)


@pytest.mark.parametrize("arch,targets", [("llama", "all"), ("gpt2", "q_proj,v_proj,down_proj")])
def test_reloading_a_saved_adapter_into_the_same_modules_is_exact(arch, targets, tmp_path):
    """What a LoRA run's resume does: the adapter comes back bit for bit into the very parameters
    the optimizer holds (GPT-2's stacked c_attn adapter included), and a mismatch is refused."""
    model = add_lora(tiny(arch), rank=4, alpha=16, targets=targets)
    randomize(model)
    save_adapter(model, tmp_path / "ad")
    torch.manual_seed(5)
    other = add_lora(tiny(arch), rank=4, alpha=16, targets=targets)
    params = {n: p for n, p in other.named_parameters() if p.requires_grad}
    load_adapter_weights(other, tmp_path / "ad")
    assert all(torch.equal(p, model.get_parameter(n)) and p is other.get_parameter(n) for n, p in params.items())
    with pytest.raises(AdapterError, match="does not fit this model's"):
        load_adapter_weights(add_lora(tiny(arch), rank=8, alpha=16, targets=targets), tmp_path / "ad")
    q_only = save_adapter(add_lora(tiny(arch), rank=4, alpha=16, targets="q_proj"), tmp_path / "q")
    with pytest.raises(AdapterError, match="no adapter weights for"):
        load_adapter_weights(add_lora(tiny(arch), rank=4, alpha=16, targets=targets), q_only)


def test_peft_key_names_for_llama(tmp_path):
    from safetensors import safe_open

    model = add_lora(tiny("llama"), rank=2, targets="q_proj,gate_proj")
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2


@pytest.mark.parametrize("arch,targets", [("llama", "all"), ("gpt2", "all"), ("gpt2", "k_proj,o_proj")])
def test_peft_loads_our_adapter_onto_the_hf_export(arch, targets, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from pocketlm.model.hf import export_hf

    tok = Tokenizer.train(["hello world " * 50, "the quick brown fox jumps"], vocab_size=300)
    model = tiny(arch, vocab_size=tok.vocab_size)
    export_hf(model, tok, tmp_path / "hf")
    add_lora(model, rank=4, alpha=8, targets=targets)
    randomize(model)
    save_adapter(model, tmp_path / "ad")
    ids = IDS % tok.vocab_size
    ours = model(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    plain = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert not torch.allclose(plain, ours, atol=1e-3)
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


def test_peft_trained_adapter_loads_into_pocketlm(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from pocketlm.model.hf import export_hf

    tok = Tokenizer.train(["hello world " * 50, "the quick brown fox jumps"], vocab_size=300)
    model = tiny("gpt2", vocab_size=tok.vocab_size)
    export_hf(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a dense c_attn update, not block-diagonal
    pm.save_pretrained(tmp_path / "ad")
    ids = IDS % tok.vocab_size
    with torch.no_grad():
        want = pm.eval()(ids).logits
    got = apply_adapter(model, tmp_path / "ad")(ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_errors_name_what_is_wrong(tmp_path):
    model = tiny("gpt2")
    with pytest.raises(AdapterError, match="gate_proj"):
        add_lora(model, targets="gate_proj")
    with pytest.raises(AdapterError, match="expected some of"):
        add_lora(tiny(), targets="qproj")
    with pytest.raises(AdapterError, match="not an adapter directory"):
        apply_adapter(tiny(), tmp_path)
    big = add_lora(tiny("llama", n_embd=64), rank=2)
    save_adapter(big, tmp_path / "big")
    with pytest.raises(AdapterError, match="another model"):
        apply_adapter(tiny("llama"), tmp_path / "big")
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_adapter(tiny(), tmp_path / "none")


def test_merge_verb_and_load_model_with_adapter(tmp_path):
    tok = Tokenizer.train(["hello world " * 50], vocab_size=300)
    model = tiny(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "base", model, tok)
    add_lora(model, rank=4)
    randomize(model)
    ids = IDS % tok.vocab_size
    want = model(ids)
    save_adapter(model, tmp_path / "ad")
    m2, _ = load_model_with_adapter(tmp_path / "base", tmp_path / "ad")
    assert torch.allclose(m2(ids), want, atol=1e-5)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(ids), want, atol=1e-5)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nothere"), "--out", str(tmp_path / "x")]) == 2
