"""`pocketlm eval`: metrics against hand-worked values, and each task against an independent computation."""

import json
import math

import pytest
import torch

from reference import generate

from pocketlm.cli import main
from pocketlm.eval.metrics import classification_report, exact_match, normalize_answer, qa_report, token_f1
from pocketlm.eval.tasks import greedy_generate
from pocketlm.model import GPT, ModelConfig, load_model, save_checkpoint
from pocketlm.tokenizer import Tokenizer


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("an apple", "Apple.") == 1.0
    assert token_f1("the big red dog", "red dog house") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    r = qa_report([["Paris", "paris France"], [], ["blue"]], ["Paris, France", "", "red"])
    assert r["n"] == 3 and r["has_ans"]["n"] == 2 and r["no_ans"] == {"n": 1, "exact": 100.0, "f1": 100.0}
    assert r["has_ans"]["exact"] == 50.0 and r["exact"] == pytest.approx(200 / 3)


def test_classification_report_by_hand():
    r = classification_report(["a", "a", "b", "b", "b"], ["a", "b", "b", "b", None], ["a", "b"])
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["confusion"] == {"a": {"a": 1, "b": 1, "other": 0}, "b": {"a": 0, "b": 2, "other": 1}}
    f1_a = 2 * 1.0 * 0.5 / 1.5
    f1_b = 2 * (2 / 3) * (2 / 3) / (4 / 3)
    assert r["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


@pytest.fixture(scope="module")
def tiny(tokenizer_dir, tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=256))
    path = tmp_path_factory.mktemp("m") / "tiny"
    save_checkpoint(path, model, tok)
    return path


def run_eval(capsys, *args):
    assert main(["eval", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_lm_bits_per_byte_matches_a_direct_computation(tiny, tmp_path, capsys):
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "r.json"
    r = run_eval(capsys, "--model", tiny, "--task", "lm", "--data", tmp_path / "t.txt", "--dtype", "fp32", "--out", out)
    assert json.loads(out.read_text()) == r
    model, tok = load_model(tiny)
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(text.encode())), rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nats / (ids.size(1) - 1)), rel=1e-4)


def test_classification_likelihood_matches_scoring_each_label_by_hand(tiny, tmp_path, capsys):
    rows = [{"text": f"sample {i} " + "good " * (i % 3), "label": "yes" if i % 2 else "no"} for i in range(10)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_eval(capsys, "--model", tiny, "--task", "classification", "--data", tmp_path / "c.jsonl",
                 "--dtype", "fp32", "--batch-size", 3, "--instruction", "Yes or no?")
    model, tok = load_model(tiny)
    confusion = {"no": {"no": 0, "yes": 0}, "yes": {"no": 0, "yes": 0}}
    for row in rows:
        scores = {}
        for label in ("no", "yes"):
            msgs = [{"role": "user", "content": f"Yes or no?\n\n{row['text']}"}]
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": label}], add_generation_prompt=False)
            p, f = tok.encode(prompt), tok.encode(full.rstrip())  # reply = label + end-of-turn
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([f]))[0], -1)
            scores[label] = sum(logp[i - 1, f[i]].item() for i in range(len(p), len(f)))
        confusion[row["label"]][max(scores, key=scores.get)] += 1
    got = {g: {p: n for p, n in row.items() if p != "other"} for g, row in r["likelihood"]["confusion"].items()}
    assert got == confusion
    assert r["generation"]["n"] == 10 and r["labels"] == ["no", "yes"]


def test_batched_greedy_generation_matches_the_reference_loop(tiny):
    model, tok = load_model(tiny)
    prompts = [tok.encode("To be or"), tok.encode("What light through yonder window"), tok.encode("O")]
    got = greedy_generate(model, tok, prompts, 6, batch_size=2)  # three prompts, two rows: one waits its turn
    for p, g in zip(prompts, got):
        want = generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()
        ends = [i for i, t in enumerate(want) if t in tok.stop_ids]
        assert g == want[:ends[0] if ends else None]


def test_qa_counts_the_no_answer_phrase_as_no_answer(tiny, tmp_path, capsys, monkeypatch):
    rows = [{"context": "Oslo is cold.", "question": "What is cold?", "answers": ["Oslo"]},
            {"context": "Oslo is cold.", "question": "What is hot?", "answers": []},
            {"context": "Oslo is cold.", "question": "What is warm?", "answers": []}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tok = load_model(tiny)
    import pocketlm.eval.tasks as tasks
    monkeypatch.setattr(tasks, "greedy_generate", lambda model, tok_, prompts, *a, **k: [tok.encode("No idea.")] * len(prompts))
    r = run_eval(capsys, "--model", tiny, "--task", "qa", "--data", tmp_path / "q.jsonl", "--no-answer", "no idea")
    assert r["no_ans"] == {"n": 2, "exact": 100.0, "f1": 100.0}
    assert r["has_ans"]["n"] == 1 and r["has_ans"]["exact"] == 0.0
    assert r["examples"][0]["prediction"] == "No idea."
    monkeypatch.undo()
    r = run_eval(capsys, "--model", tiny, "--task", "qa", "--data", tmp_path / "q.jsonl", "--limit", 2)
    assert r["n"] == 2  # a real (random) model's replies go through the same scoring


def test_eval_errors(tiny, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": 5, "label": "b"}\n')
    assert main(["eval", "--model", str(tiny), "--task", "classification", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: field 'text'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny), "--task", "qa", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "classification data, but the task is qa" in capsys.readouterr().err


def test_generated_replies_are_matched_to_label_words():
    from pocketlm.eval.tasks import _match_label

    names = ["negative", "positive"]
    assert _match_label(" Positive.", names) == "positive"
    assert _match_label("The sentiment of this review is negative.", names) == "negative"
    assert _match_label("It is not positive, it is negative", names) is None  # both words: undecided
    assert _match_label("meh", names) is None


@pytest.mark.parametrize("lacks_bf16", [True, False])
def test_bf16_eval_computes_in_fp32_where_the_cpu_only_emulates_bf16(tiny, tmp_path, capsys, monkeypatch, lacks_bf16):
    import pocketlm.train.loop as loop

    monkeypatch.setattr(loop, "cpu_lacks_bf16", lambda device: lacks_bf16)
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question")
    fp32 = run_eval(capsys, "--model", tiny, "--task", "lm", "--data", tmp_path / "t.txt", "--dtype", "fp32")
    r = run_eval(capsys, "--model", tiny, "--task", "lm", "--data", tmp_path / "t.txt", "--dtype", "bf16")
    assert r["dtype"] == "bf16"  # what was asked (the card's command); what ran says computed_dtype
    if lacks_bf16:
        assert r["computed_dtype"] == "fp32" and r["bits_per_byte"] == fp32["bits_per_byte"]
    else:
        assert "computed_dtype" not in r and r["bits_per_byte"] != fp32["bits_per_byte"]
