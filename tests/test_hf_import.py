"""Import of Hugging Face folders: logits and greedy tokens equal transformers' on the same weights."""

import json

import pytest
import torch
from reference import generate
from tiny_hf import PROMPTS, hf_greedy, hf_logits, our_logits, save_hf_folder

from pocketlm.cli import main
from pocketlm.model import load_model
from pocketlm.tokenizer import Tokenizer

pytest.importorskip("transformers")
KINDS = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def hf_folder(request, tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    # the Llama folder is sharded (model.safetensors.index.json + several files)
    ref = save_hf_folder(request.param, folder, tokenizer_dir, shard=request.param == "llama")
    return request.param, folder, ref


def test_logits_and_greedy_tokens_match_transformers(hf_folder, tokenizer_dir):
    kind, folder, ref = hf_folder
    if kind == "llama":  # read from several shards
        assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    model, tok = load_model(folder)
    assert isinstance(tok, Tokenizer)
    assert model.cfg.arch == ("gpt2" if kind == "gpt2" else "llama")
    assert model.cfg.qkv_bias == (kind == "qwen2")
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert ids == Tokenizer.load(tokenizer_dir).encode(prompt)
        torch.testing.assert_close(our_logits(model, ids), hf_logits(ref, ids), atol=1e-4, rtol=0)
    ids = tok.encode(PROMPTS[0])
    ours = generate(model, torch.tensor([ids]), 16)[0].tolist()
    assert ours == hf_greedy(ref, ids, 16)


def test_chat_template_comes_with_the_tokenizer(hf_folder):
    _, folder, _ = hf_folder
    assert (folder / "chat_template.jinja").exists()  # transformers 5 keeps it out of tokenizer_config.json
    _, tok = load_model(folder)
    assert tok.config["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_import_verb_writes_a_checkpoint(hf_folder, tmp_path, capsys):
    kind, folder, ref = hf_folder
    out = tmp_path / "ckpt"
    assert main(["import", str(folder), "--out", str(out)]) == 0
    assert "imported" in capsys.readouterr().out
    assert "model" in json.loads((out / "config.json").read_text())
    model, tok = load_model(out)
    ids = tok.encode(PROMPTS[1])
    torch.testing.assert_close(our_logits(model, ids), hf_logits(ref, ids), atol=1e-4, rtol=0)


# ---- malformed folders: one clear error each, through the CLI ------------------------------------
def _import_fails(source, tmp_path, capsys) -> str:
    assert main(["import", str(source), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


@pytest.fixture
def llama_folder(tokenizer_dir, tmp_path):
    folder = tmp_path / "llama"
    save_hf_folder("llama", folder, tokenizer_dir)
    return folder


def test_truncated_safetensors(llama_folder, tmp_path, capsys):
    weights = llama_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = _import_fails(llama_folder, tmp_path, capsys)
    assert "model.safetensors" in err and "cannot read safetensors" in err


def test_unknown_architecture(llama_folder, tmp_path, capsys):
    config = json.loads((llama_folder / "config.json").read_text())
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (llama_folder / "config.json").write_text(json.dumps(config))
    err = _import_fails(llama_folder, tmp_path, capsys)
    assert "'phi3'" in err and "Phi3ForCausalLM" in err and "not supported" in err


def test_sliding_window_is_refused(llama_folder, tmp_path, capsys):
    config = json.loads((llama_folder / "config.json").read_text())
    config.update(model_type="mistral", sliding_window=16)
    (llama_folder / "config.json").write_text(json.dumps(config))
    assert "sliding_window=16" in _import_fails(llama_folder, tmp_path, capsys)


def test_missing_tokenizer(llama_folder, tmp_path, capsys):
    (llama_folder / "tokenizer.json").unlink()
    err = _import_fails(llama_folder, tmp_path, capsys)
    assert "missing tokenizer.json" in err and str(llama_folder) in err


def test_missing_weights_and_pickles_refused(llama_folder, tmp_path, capsys):
    (llama_folder / "model.safetensors").rename(llama_folder / "pytorch_model.bin")
    err = _import_fails(llama_folder, tmp_path, capsys)
    assert "no model.safetensors" in err and "pytorch_model.bin" in err


def test_weights_that_do_not_fit_the_config(llama_folder, tmp_path, capsys):
    config = json.loads((llama_folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama_folder / "config.json").write_text(json.dumps(config))
    err = _import_fails(llama_folder, tmp_path, capsys)
    assert "mlp.gate_proj.weight" in err and "(96, 64)" in err
