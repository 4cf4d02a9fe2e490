import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm.cli import main
from pocketlm.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_vocab(tok):
    assert tok.vocab_size == 512
    for t in SPECIAL_TOKENS:
        assert tok.token_id(t) is not None
    # a special token in text is one token, not its characters
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")]
    assert tok.bos_id == tok.token_id("<|endoftext|>")


def test_learns_merges_and_byte_lengths(tok):
    ids = tok.encode("First Citizen:\nBefore we proceed")
    assert len(ids) < len("First Citizen:\nBefore we proceed") / 2  # BPE merges, not bytes
    lengths = tok.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len("First Citizen:\nBefore we proceed".encode())
    assert lengths[tok.bos_id] == 0


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_is_sandboxed(tok, tmp_path):
    evil = Tokenizer(tok.hf, {**tok.config, "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(Exception, match="unsafe|access"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_save_load_same_fingerprint(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint() == tok.fingerprint()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_cli_errors_on_empty_and_invalid_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenizer", "train", "--input", str(empty), "--out", str(tmp_path / "t")]) == 2
    assert "empty corpus" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff byte\n")
    assert main(["tokenizer", "train", "--input", str(bad), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2" in err and "UTF-8" in err
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "missing.txt" in capsys.readouterr().err
