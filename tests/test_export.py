"""Export to a Hugging Face folder: transformers loads it with no custom code and computes the same logits."""

import json

import pytest
import torch
from tiny_hf import PROMPTS, hf_logits, our_logits

from pocketlm.cli import main
from pocketlm.model import GPT, ModelConfig, load_model, save_checkpoint
from pocketlm.model.hf import export_hf
from pocketlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

MIXED_TEXT = ("Hello, world! def f(x):\n    return x ** 2  # code\n\n\n   three spaces\ttab 🤖🎉 "
              "日本語 中文 한국어 can't 3.14159 2024 <|im_start|>user\nhi<|im_end|>")
DIGITS = ["In 1999 there were 2024 cases, 1999 and 2024 again; 123 456 789 " * 3, "hello world café"] * 50
# arch kwargs -> the transformers class the export must declare
MODELS = {
    "gpt2": (dict(arch="gpt2"), "GPT2LMHeadModel"),
    "llama-gqa": (dict(arch="llama", n_kv_head=2, rope_theta=5000.0, tie_embeddings=False), "LlamaForCausalLM"),
    # not Qwen2ForCausalLM: transformers would swap in Qwen2Tokenizer and re-tokenize our text differently
    "llama-qkv-bias": (dict(arch="llama", qkv_bias=True), "LlamaForCausalLM"),
}


def tiny_model(vocab_size: int, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64, **kw))
    with torch.no_grad():  # biases and norm weights random too, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tokenizer_dir, tmp_path_factory):
    """A pocketlm checkpoint and its export through the CLI."""
    kw, hf_class = MODELS[request.param]
    tok = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tok.vocab_size, **kw)
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    save_checkpoint(root / "ckpt", model, tok)
    assert main(["export", str(root / "ckpt"), "--format", "hf", "--out", str(root / "hf")]) == 0
    return model, tok, root / "hf", hf_class


def test_transformers_loads_it_and_computes_the_same_logits(exported):
    model, tok, folder, hf_class = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [hf_class] and "auto_map" not in config
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(ref).__name__ == hf_class
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        torch.testing.assert_close(hf_logits(ref, ids), our_logits(model, ids), atol=1e-4, rtol=0)


def test_reimport_gives_identical_weights(exported):
    model, _, folder, _ = exported
    again, _ = load_model(folder)
    assert again.cfg == model.cfg
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_auto_tokenizer_encodes_identically(exported):
    _, tok, folder, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(MIXED_TEXT, add_special_tokens=False) == tok.encode(MIXED_TEXT)
    assert hf_tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(messages)


def test_qkv_bias_model_keeps_its_tokenizer(tmp_path):
    """A tokenizer that merges digit groups (ours do) must survive: transformers' Qwen2 class would split them."""
    tok = Tokenizer.train(DIGITS, vocab_size=300)
    assert len(tok.encode("2024")) < 4
    export_hf(tiny_model(tok.vocab_size, arch="llama", qkv_bias=True), tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("In 2024, 1999 cases", add_special_tokens=False) == tok.encode("In 2024, 1999 cases")


def test_generation_config(exported):
    _, tok, folder, _ = exported
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert tok.token_id("<|im_end|>") in gen.eos_token_id
    assert gen.bos_token_id == tok.bos_id


def test_export_replaces_atomically_and_fails_cleanly(tokenizer_dir, tmp_path, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    out = tmp_path / "hf"
    export_hf(tiny_model(tok.vocab_size, arch="llama"), tok, out)
    export_hf(tiny_model(tok.vocab_size, arch="gpt2"), tok, out)  # over an existing export
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind
    # GPT-2 has no grouped-query attention: refused, and the previous export is untouched
    save_checkpoint(tmp_path / "gqa", tiny_model(tok.vocab_size, arch="gpt2", n_kv_head=2), tok)
    assert main(["export", str(tmp_path / "gqa"), "--format", "hf", "--out", str(out)]) == 2
    assert "n_kv_head" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqa", "hf"]


def test_export_needs_a_tokenizer(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", tiny_model(300, arch="llama"), None)
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
