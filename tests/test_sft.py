"""Fine-tuning data: format detection, validation errors that name the line, the assistant-only loss mask."""

import json
import math

import pytest
import torch

from pocketlm.cli import main
from pocketlm.data.sft import SFTDataError, TaskSpec, assistant_spans, encode_example, encode_examples, load_examples, parse_labels
from pocketlm.data.sft_batches import SFTBatches, pack_batch, pack_rows, pad_batch
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                     {"role": "assistant", "content": "A humble servant."}, {"role": "user", "content": "And thy name?"},
                     {"role": "assistant", "content": "Horatio, my lord."}]}


def test_loss_mask_covers_only_the_assistant_replies(tok):
    ids, scored = encode_example(tok, CHAT["messages"])
    text = tok.decode([t for t, s in zip(ids, scored) if s])
    # both replies, each with its end-of-turn token, and nothing of the system or user turns
    assert text == "A humble servant.<|im_end|>Horatio, my lord.<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False)


def test_loss_mask_with_a_template_that_adds_a_default_system_prompt(tok):
    # SmolLM2-style: a system message is inserted when the conversation has none
    t = Tokenizer(tok.hf, {**tok.config, "chat_template": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")})
    msgs = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "I will."}]
    ids, scored = encode_example(t, msgs)
    assert t.decode([i for i, s in zip(ids, scored) if s]) == "I will.<|im_end|>"


def test_targets_are_shifted_and_padding_is_ignored(tok):
    enc, dropped = encode_examples(tok, load_examples_from_rows(tok, [CHAT, CHAT]), max_len=1000)
    assert dropped == 0
    x, y = pad_batch([enc[0], (enc[1][0][:10], enc[1][1][:10])], pad_id=0)
    ids, labels = enc[0]
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == labels[1:]
    assert (y[1, 9:] == -100).all()


def load_examples_from_rows(tok, rows, tmp=None):
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp())
    return load_examples(write_jsonl(d / "d.jsonl", rows))[0]


def test_formats_are_detected_and_converted(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "hi"}])
    ex, spec = load_examples(pc)
    assert spec.format == "prompt_completion" and ex[0].messages[-1] == {"role": "assistant", "content": "hi"}

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Name a colour", "input": "", "output": "red"}]))
    ex, spec = load_examples(alpaca)
    assert ex[0].messages[0]["content"] == "Add\n\n2 and 3" and ex[1].messages[0]["content"] == "Name a colour"

    tsv = tmp_path / "sst.tsv"  # label first, CRLF line endings, quotes are plain characters
    tsv.write_bytes(b'label\tsentence\r\n1\ta "fine" film\r\n0\tdull\r\n')
    ex, spec = load_examples(tsv, TaskSpec("classification", system="Judge.", labels=parse_labels("0=negative,1=positive")))
    assert spec.format == "classification" and [e.label for e in ex] == ["1", "0"]
    assert ex[0].messages[0] == {"role": "system", "content": "Judge."}
    assert ex[0].messages[1]["content"].endswith('a "fine" film') and ex[0].messages[-1]["content"] == "positive"

    csv = tmp_path / "c.csv"
    csv.write_text('text,label\n"multi\nline, with comma",spam\nok,ham\n')
    ex, spec = load_examples(csv)
    assert spec.labels == {"ham": "ham", "spam": "spam"} and "multi\nline, with comma" in ex[0].messages[0]["content"]

    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]},
        {"context": "Paris is in France.", "question": "Where is Rome?", "answers": {"text": [], "answer_start": []}}])
    ex, spec = load_examples(qa)
    assert spec.format == "qa" and ex[0].messages[-1]["content"] == "France"
    assert ex[1].answers == [] and ex[1].messages[-1]["content"] == "unanswerable"

    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Oslo is cold.", "qas": [
        {"id": "a", "question": "What is cold?", "answers": [{"text": "Oslo", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "What is hot?", "answers": [], "is_impossible": True}]}]}]}))
    ex, spec = load_examples(squad)
    assert [e.answers for e in ex] == [["Oslo"], []]


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "completion": "b"}, "{not json"], r"d.jsonl:2: invalid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"d.jsonl:2: fields \['prompt'\] are not prompt_completion"),
    ([{"prompt": "a", "completion": 3}], r"d.jsonl:1: field 'completion': expected a non-empty string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl:1: no assistant message"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], r"d.jsonl:1: messages\[0\]: expected"),
    ([{"question": "q", "answer": "a"}], r"d.jsonl:1: cannot tell the data format"),
    ([{"context": "abc", "question": "q", "answers": ["xyz"]}], r"d.jsonl:1: answer 'xyz' does not occur in the context"),
    ([{"text": "t", "label": ""}], r"d.jsonl:1: field 'label'"),
    ([{"text": "t", "label": "a"}, "", {"text": "t", "label": None}], r"d.jsonl:3: field 'label'"),
])
def test_bad_rows_are_reported_with_their_line(tmp_path, rows, message):
    with pytest.raises(SFTDataError, match=message):
        load_examples(write_jsonl(tmp_path / "d.jsonl", rows))


def test_other_file_errors(tmp_path):
    with pytest.raises(SFTDataError, match=r"c.csv:3: 1 columns, the header has 2"):
        (tmp_path / "c.csv").write_text("text,label\ngood,1\nbad\n")
        load_examples(tmp_path / "c.csv")
    with pytest.raises(SFTDataError, match="label '7' is not one of"):
        (tmp_path / "l.csv").write_text("text,label\ngood,1\nbad,7\n")
        load_examples(tmp_path / "l.csv", TaskSpec("classification", labels={"0": "no", "1": "yes"}))
    with pytest.raises(SFTDataError, match="unsupported file type"):
        (tmp_path / "x.parquet").write_text("")
        load_examples(tmp_path / "x.parquet")
    with pytest.raises(SFTDataError, match="this file is classification data, but the task is qa"):
        load_examples(tmp_path / "l.csv", TaskSpec("qa"))


def test_finetune_verb_reports_the_bad_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    assert main(["finetune", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "pocketlm finetune: error:" in capsys.readouterr().err


def test_invalid_rows_can_be_skipped_and_counted(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": ""},
            {"instruction": "d", "input": "x", "output": "e"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(SFTDataError, match=r"d.json: record 1: field 'output'"):
        load_examples(tmp_path / "d.json")
    skipped = []
    ex, _ = load_examples(tmp_path / "d.json", skipped=skipped)
    assert [e.messages[-1]["content"] for e in ex] == ["b", "e"]
    assert len(skipped) == 1 and "record 1: field 'output'" in skipped[0]
    (tmp_path / "bad.json").write_text(json.dumps(rows[1:2]))
    with pytest.raises(SFTDataError, match="no valid rows"):
        load_examples(tmp_path / "bad.json", skipped=[])


def test_batches_resume_exactly_and_group_lengths(tok):
    rows = [([1] * n, [-100] * (n - 1) + [5]) for n in range(3, 43)]
    a = SFTBatches(rows, 4, pad_id=0, seed=3)
    for _ in range(12):  # crosses an epoch boundary (10 batches per epoch)
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(5)]
    b = SFTBatches(rows, 4, pad_id=0, seed=3)
    b.load_state_dict(state)
    for (x1, y1, d1, n1), (x2, y2, d2, n2) in zip(want, [b.next_batch() for _ in range(5)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and d1 is d2 is None and n1 == n2
    # grouped by length: a batch's rows differ little in length, so padding is small
    x, y, _, _ = a.next_batch()
    lengths = (y != -100).nonzero()[:, 1] + 1
    assert int(lengths.max() - lengths.min()) < 10


def test_cut_examples_without_a_reply_are_dropped(tok):
    exs = load_examples_from_rows(tok, [{"prompt": "word " * 200, "completion": "yes"}, {"prompt": "hi", "completion": "yes"}])
    enc, dropped = encode_examples(tok, exs, max_len=64)
    assert dropped == 1 and len(enc) == 1


def test_spans_refuse_templates_that_rewrite_earlier_turns(tok):
    t = Tokenizer(tok.hf, {**tok.config, "chat_template": "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    with pytest.raises(SFTDataError, match="prefix"):
        assistant_spans(t, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def varied_examples(tok, n, seed=0):
    """Chat examples of assorted lengths, with multi-turn replies so the loss mask has several spans."""
    import random
    rng = random.Random(seed)
    words = "thou art the king of Denmark and I thy humble servant my lord".split()
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 2)):
            msgs += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))}]
        rows.append({"messages": msgs})
    enc, dropped = encode_examples(tok, load_examples_from_rows(tok, rows), max_len=1000)
    assert dropped == 0
    return enc


def test_packer_never_splits_an_example_and_fills_rows(tok):
    enc = varied_examples(tok, 60)
    lengths = [len(ids) - 1 for ids, _ in enc]
    cap = 2 * max(lengths)
    rows = pack_rows(lengths, cap)
    assert sorted(i for row in rows for i in row) == list(range(len(enc)))  # every example once, whole
    assert all(sum(lengths[i] for i in row) <= cap for row in rows)
    assert len(rows) <= 11 / 9 * math.ceil(sum(lengths) / cap) + 1  # best-fit decreasing's bound
    # each batch: every doc_ids segment is one whole example, inputs and loss mask as it had alone
    data = SFTBatches(enc, 2, pad_id=0, seed=1, pack_len=cap)
    by_inputs = {tuple(ids[:-1]): labels[1:] for ids, labels in enc}
    seen = 0
    for _ in range(data.steps_per_epoch()):
        x, y, doc, real = data.next_batch()
        assert (doc[:, 1:] >= doc[:, :-1]).all()
        for b in range(x.size(0)):
            n_docs = int(doc[b].max()) + 1
            for k in range(n_docs):
                at = doc[b] == k
                if k == n_docs - 1 and (y[b, at] == -100).all() and tuple(x[b, at].tolist()) not in by_inputs:
                    continue  # the row's padding
                assert y[b, at].tolist() == by_inputs[tuple(x[b, at].tolist())]
                seen += 1
        assert real == sum(int((doc[b] < len(data.rows[r])).sum()) for b, r in enumerate(data._order[data.index - 1]))
    assert seen >= len(enc) - 2 * max(map(len, data.rows))  # all but the ragged last batch's
    with pytest.raises(SFTDataError, match="more than a packed row"):
        pack_rows([3, 9], 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_loss_equals_the_unpacked_loss(tok, arch):
    """The mean loss over the scored tokens, and its gradient, are the same whether the examples sit
    one per padded row or packed several to a row: nothing leaks across examples in a row."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128))
    enc = varied_examples(tok, 12, seed=2)
    x, y = pad_batch(enc, pad_id=0)
    rows = pack_rows([len(ids) - 1 for ids, _ in enc], 96)
    assert len(rows) < len(enc)
    px, py, doc, real = pack_batch([[enc[i] for i in row] for row in rows], pad_id=0)
    assert real == sum(len(ids) - 1 for ids, _ in enc) and px.numel() < x.numel()

    def loss_and_grad(*args, **kw):
        model.zero_grad()
        _, loss = model(*args, **kw)
        loss.backward()
        return loss, model.layers[0].attn.q_proj.weight.grad.clone()

    loss, grad = loss_and_grad(x, y)
    packed_loss, packed_grad = loss_and_grad(px, py, doc_ids=doc)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_grad, grad, atol=1e-9, rtol=1e-4)  # the gradient is ~1e-4 here
    # the same rows without doc_ids: later examples see earlier ones, and the gradient shows it
    _, leaky_grad = loss_and_grad(px, py)
    assert (leaky_grad - grad).abs().max() > 100 * (packed_grad - grad).abs().max()
